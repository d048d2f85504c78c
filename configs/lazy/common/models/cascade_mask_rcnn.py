"""The papers' Cascade Mask R-CNN on a pvt_d2 backbone (the model of configs/base/cascade_mask_rcnn_3x.yaml).

Three stages at IoU 0.5 / 0.6 / 0.7 with loss weights 1 / 0.5 / 0.25, each a
box head of 4 convs (SyncBN over several CUDA processes, plain BN in one) + 1 fc, class-specific
GIoU box regression (weight 10) and its own mask head
(:class:`pvt_d2.modeling.roi_heads.PaperCascadeROIHeads`). Every box predictor
and mask head takes ``model.roi_heads.num_classes``.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, MaskRCNNConvUpsampleHead

from pvt_d2.modeling.roi_heads import PaperCascadeROIHeads, box_head_norm

from .mask_rcnn import model

for key in ("box_head", "box_predictor", "proposal_matcher", "mask_head"):
    model.roi_heads.pop(key)

model.proposal_generator.post_nms_topk = [2000, 1000]
model.proposal_generator.smooth_l1_beta = 0.1111111111111111  # the official cascade RPN: SmoothL1Loss(beta=1/9)
model.roi_heads.update(
    _target_=PaperCascadeROIHeads,
    stage_loss_weights=[1.0, 0.5, 0.25],
    proposal_matchers=[L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False)
                       for iou in (0.5, 0.6, 0.7)],
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels="${.....backbone.out_channels}", height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm=L(box_head_norm)(norm="SyncBN", device="cuda"),  # "BN" in one process: the same statistics
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            num_classes="${...num_classes}",
            box2box_transform=L(Box2BoxTransform)(weights=[w, w, w / 2, w / 2]),
            box_reg_loss_type="giou",
            loss_weight={"loss_cls": stage, "loss_box_reg": 10.0 * stage},
            test_score_thresh=0.05,
        )
        for w, stage in ((10.0, 1.0), (20.0, 0.5), (30.0, 0.25))
    ],
    mask_head=[
        L(MaskRCNNConvUpsampleHead)(
            input_shape=ShapeSpec(channels="${.....backbone.out_channels}", height=14, width=14),
            num_classes="${...num_classes}",
            conv_dims=[256, 256, 256, 256, 256],
        )
        for _ in range(3)
    ],
)
