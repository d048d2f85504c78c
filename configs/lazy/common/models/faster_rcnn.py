"""Faster R-CNN with a P2-P6 FPN on a pvt_d2 backbone (configs/base/faster_rcnn_1x.yaml): Mask R-CNN without
its mask head, for datasets whose objects have boxes but no masks."""
from .mask_rcnn import model

for key in ("mask_in_features", "mask_pooler", "mask_head"):
    model.roi_heads.pop(key)
