"""Mask R-CNN with a P2-P6 FPN on a pvt_d2 backbone (the model of configs/base/mask_rcnn_1x.yaml).

detectron2's common/models/mask_rcnn_fpn.py with pvt_d2's input (RGB,
ImageNet mean and std) and every head's input channels tied to the FPN's
``out_channels``. A config file sets ``model.backbone.bottom_up``; set
``model.roi_heads.num_classes`` once and the box predictor and mask head follow.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from pvt_d2.modeling.backbone import create_backbone

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up = L(create_backbone)(name="???", out_features=["res2", "res3", "res4", "res5"])
model.proposal_generator.head.in_channels = "${...backbone.out_channels}"
model.roi_heads.box_head.input_shape.channels = "${....backbone.out_channels}"
model.roi_heads.mask_head.input_shape.channels = "${....backbone.out_channels}"
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
