"""Cascade Mask R-CNN heads as the PVT v2 and GC ViT papers trained them.

The papers' 3x Cascade Mask R-CNN (whai362/PVT
``detection/configs/cascade_mask_rcnn_pvt_v2_b2_fpn_3x_mstrain_fp16.py`` and
NVlabs/GCVit ``detection/configs/gcvit/cascade_mask_rcnn_gcvit_tiny_3x_coco.py``,
both mmdetection ``CascadeRoIHead``) differs from detectron2's stock
``CascadeROIHeads`` in five points, all reproduced by
:class:`PaperCascadeROIHeads`:

1. Box heads of 4 convs + 1 fc with a norm on the convs (``ROI_BOX_HEAD``:
   ``NUM_CONV 4``, ``NUM_FC 1``, ``NORM "SyncBN"``). SyncBN needs several CUDA
   processes; in one process the same statistics are plain ``BN``, and in
   several CPU processes (gloo) detectron2's ``naiveSyncBN`` all-reduces them,
   so the head builds on any device (:func:`box_head_norm`).
2. Class-specific box regression (``CLS_AGNOSTIC_BBOX_REG False``) trained on
   decoded boxes with the GIoU loss (``BBOX_REG_LOSS_TYPE "giou"``, weight 10).
   Between stages a box is refined with the deltas of its ground-truth class
   in training (of its best non-background class for background boxes) and of
   its best non-background class at test time.
3. Stage losses weighted ``1 / 0.5 / 0.25``
   (``ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS``) instead of detectron2's equal
   weights with the features' gradients scaled by 1/3.
4. One mask head per stage, each trained on the positive boxes of its stage.
   At test time every mask head predicts the final boxes and the stages'
   mask probabilities (sigmoids) are averaged.
5. Test-time class scores: the stages' logits are averaged, then the softmax
   is taken (detectron2 averages the probabilities).
6. Training samples per stage: every stage drops the ground-truth boxes it
   was given, refines the others, adds the ground-truth boxes again, matches
   at its own IoU and samples ``ROI_HEADS.BATCH_SIZE_PER_IMAGE`` boxes with
   ``POSITIVE_FRACTION`` positives (mmdetection's per-stage assigner and
   sampler); detectron2 re-matches the first stage's whole sample instead.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, select_foreground_proposals
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, fast_rcnn_inference
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = ["PaperCascadeROIHeads", "box_head_norm"]


def box_head_norm(norm: str, device: str) -> str:
    """The norm the box heads can use in this process for ``MODEL.ROI_BOX_HEAD.NORM``.

    ``"SyncBN"`` (the papers' choice) needs several CUDA processes. In a single
    process its statistics are exactly those of ``"BN"``; in several CPU
    processes detectron2's ``"naiveSyncBN"`` synchronises them over gloo.
    Other norms are returned unchanged.
    """
    if norm != "SyncBN":
        return norm
    if comm.get_world_size() == 1:
        return "BN"
    return "SyncBN" if device.startswith("cuda") else "naiveSyncBN"


@ROI_HEADS_REGISTRY.register()
class PaperCascadeROIHeads(CascadeROIHeads):
    """Cascade R-CNN heads with mmdetection's ``CascadeRoIHead`` semantics (see the module docstring).

    ``MODEL.ROI_HEADS.NAME: "PaperCascadeROIHeads"``. ``self.mask_head`` is a
    ``ModuleList`` with one mask head per stage.
    """

    @configurable
    def __init__(self, *, stage_loss_weights: Sequence[float], **kwargs):
        """
        Args:
            stage_loss_weights: multiplier of every loss of each stage.
            kwargs: as :class:`~detectron2.modeling.roi_heads.CascadeROIHeads`;
                ``mask_head`` is a list with one head per stage.
        """
        if kwargs.get("mask_head") is not None:
            kwargs["mask_head"] = nn.ModuleList(kwargs["mask_head"])
        super().__init__(**kwargs)
        if len(stage_loss_weights) != self.num_cascade_stages:
            raise ValueError(f"MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS has {len(stage_loss_weights)} values "
                             f"for {self.num_cascade_stages} stages")
        if self.mask_on and len(self.mask_head) != self.num_cascade_stages:
            raise ValueError(f"{len(self.mask_head)} mask heads for {self.num_cascade_stages} stages")
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["stage_loss_weights"] = cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        in_features = cfg.MODEL.ROI_HEADS.IN_FEATURES
        ious = cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS
        reg_weights = cfg.MODEL.ROI_BOX_CASCADE_HEAD.BBOX_REG_WEIGHTS
        stage_weights = cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS
        if not len(ious) == len(reg_weights) == len(stage_weights):
            raise ValueError("MODEL.ROI_BOX_CASCADE_HEAD.IOUS, BBOX_REG_WEIGHTS and STAGE_LOSS_WEIGHTS need one "
                             f"value per stage, got {len(ious)}, {len(reg_weights)} and {len(stage_weights)}")
        if ious[0] != cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]:
            raise ValueError(f"The first cascade IoU ({ious[0]}) must equal MODEL.ROI_HEADS.IOU_THRESHOLDS[0] "
                             f"({cfg.MODEL.ROI_HEADS.IOU_THRESHOLDS[0]}): the first stage is matched there")
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"ROI head input levels {in_features} have different channels {sorted(channels)}")
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        pooler = ROIPooler(
            output_size=resolution,
            scales=tuple(1.0 / input_shape[k].stride for k in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        head_cfg = cfg.clone()
        head_cfg.defrost()
        head_cfg.MODEL.ROI_BOX_HEAD.NORM = box_head_norm(cfg.MODEL.ROI_BOX_HEAD.NORM, cfg.MODEL.DEVICE)
        pooled = ShapeSpec(channels=channels.pop(), height=resolution, width=resolution)
        box_loss_weight = cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT
        heads, predictors, matchers = [], [], []
        for iou, weights, stage_weight in zip(ious, reg_weights, stage_weights):
            head = build_box_head(head_cfg, pooled)
            heads.append(head)
            predictors.append(FastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=Box2BoxTransform(weights=weights),
                loss_weight={"loss_cls": stage_weight, "loss_box_reg": box_loss_weight * stage_weight}))
            matchers.append(Matcher([iou], [0, 1], allow_low_quality_matches=False))
        return {"box_in_features": in_features, "box_pooler": pooler, "box_heads": heads,
                "box_predictors": predictors, "proposal_matchers": matchers}

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if not ret:
            return ret
        if ret["mask_pooler"] is None:
            raise ValueError("PaperCascadeROIHeads needs a mask pooler (MODEL.ROI_MASK_HEAD.POOLER_TYPE)")
        resolution = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
        shape = ShapeSpec(channels=input_shape[ret["mask_in_features"][0]].channels, height=resolution,
                          width=resolution)
        num_stages = len(cfg.MODEL.ROI_BOX_CASCADE_HEAD.IOUS)
        ret["mask_head"] = [ret["mask_head"]] + [build_mask_head(cfg, shape) for _ in range(num_stages - 1)]
        return ret

    def forward(self, images, features, proposals, targets=None):
        del images
        if not self.training:
            instances = self._forward_box(features, proposals)
            return self.forward_with_given_boxes(features, instances), {}
        proposals = self._sample_stage([p.proposal_boxes for p in proposals], targets, 0)
        losses, stage_proposals = self._forward_box(features, proposals, targets)
        losses.update(self._mask_losses(features, stage_proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _run_stage(self, features, proposals, stage):
        # No gradient scaling: the stages' losses are weighted instead (STAGE_LOSS_WEIGHTS).
        box_features = self.box_pooler(features, [x.proposal_boxes for x in proposals])
        return self.box_predictor[stage](self.box_head[stage](box_features))

    def _forward_box(self, features, proposals, targets=None):
        """Run the stages.

        Returns:
            In training, ``(losses, proposals of every stage)``; at test time
            the detections (boxes of the last stage, scores from the stages'
            averaged logits).
        """
        features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        stages: List[Tuple[Tuple[torch.Tensor, torch.Tensor], List[Instances]]] = []
        boxes = None
        for k in range(self.num_cascade_stages):
            if k > 0:
                if self.training:  # the ground-truth boxes come back in the new sample, not refined
                    boxes = [b[~p.is_gt] for b, p in zip(boxes, proposals)]
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
                if self.training:
                    proposals = self._sample_stage([p.proposal_boxes for p in proposals], targets, k)
            predictions = self._run_stage(features, proposals, k)
            stages.append((predictions, proposals))
            if k + 1 < self.num_cascade_stages:
                boxes = self._refined_boxes(k, predictions, proposals)
        if self.training:
            losses = {}
            storage = get_event_storage()
            for k, (predictions, stage_proposals) in enumerate(stages):
                with storage.name_scope(f"stage{k}"):
                    stage_losses = self.box_predictor[k].losses(predictions, stage_proposals)
                losses.update({f"{name}_stage{k}": value for name, value in stage_losses.items()})
            return losses, [p for _, p in stages]
        logits = sum(predictions[0] for predictions, _ in stages) / len(stages)
        num_per_image = [len(p) for p in proposals]
        scores = F.softmax(logits, dim=-1).split(num_per_image)
        predictions, proposals = stages[-1]
        boxes = self.box_predictor[-1].predict_boxes(predictions, proposals)
        instances, _ = fast_rcnn_inference(
            boxes, scores, image_sizes, self.box_predictor[-1].test_score_thresh,
            self.box_predictor[-1].test_nms_thresh, self.box_predictor[-1].test_topk_per_image)
        return instances

    def _refined_boxes(self, stage: int, predictions, proposals: List[Instances]) -> List[torch.Tensor]:
        """The boxes of ``stage`` that the next stage starts from, one ``(R, 4)`` tensor per image."""
        boxes = self.box_predictor[stage].predict_boxes(predictions, proposals)
        if boxes and boxes[0].shape[1] == 4:  # class-agnostic regression
            return boxes
        logits = predictions[0].split([len(p) for p in proposals])
        refined = []
        for boxes_i, logits_i, proposals_i in zip(boxes, logits, proposals):
            labels = logits_i[:, :-1].argmax(dim=1)
            if self.training and proposals_i.has("gt_classes"):
                labels = torch.where(proposals_i.gt_classes < self.num_classes, proposals_i.gt_classes, labels)
            rows = torch.arange(len(boxes_i), device=boxes_i.device)
            refined.append(boxes_i.view(len(boxes_i), -1, 4)[rows, labels])
        return refined

    @torch.no_grad()
    def _sample_stage(self, boxes: List[Boxes], targets: List[Instances], stage: int) -> List[Instances]:
        """A stage's training sample: boxes + ground truth, matched at the stage's IoU, then sub-sampled.

        Returns one ``Instances`` per image with ``proposal_boxes``, ``gt_classes``
        (``num_classes`` = background), the matched ``gt_*`` fields (boxes, masks, ...)
        and ``is_gt`` (the box is a ground-truth box added here).
        """
        sampled, num_fg = [], []
        for boxes_i, targets_i in zip(boxes, targets):
            is_gt = torch.zeros(len(boxes_i), dtype=torch.bool, device=boxes_i.device)
            if self.proposal_append_gt and len(targets_i) > 0:
                boxes_i = Boxes.cat([boxes_i, targets_i.gt_boxes])
                is_gt = torch.cat([is_gt, torch.ones(len(targets_i), dtype=torch.bool, device=is_gt.device)])
            matched, labels = self.proposal_matchers[stage](pairwise_iou(targets_i.gt_boxes, boxes_i))
            keep, gt_classes = self._sample_proposals(matched, labels, targets_i.gt_classes)
            sample = Instances(targets_i.image_size)
            sample.proposal_boxes = boxes_i[keep]
            sample.is_gt = is_gt[keep]
            sample.gt_classes = gt_classes
            if len(targets_i) > 0:
                for name, value in targets_i.get_fields().items():
                    if name.startswith("gt_") and name != "gt_classes":
                        sample.set(name, value[matched[keep]])
            num_fg.append(int((gt_classes < self.num_classes).sum()))
            sampled.append(sample)
        storage = get_event_storage()
        storage.put_scalar(f"stage{stage}/roi_head/num_fg_samples", sum(num_fg) / max(len(num_fg), 1))
        storage.put_scalar(f"stage{stage}/roi_head/num_bg_samples",
                           sum(len(s) for s in sampled) / max(len(sampled), 1) - sum(num_fg) / max(len(num_fg), 1))
        return sampled

    def _mask_losses(self, features: Dict[str, torch.Tensor], stage_proposals: List[List[Instances]]):
        """Each stage's mask head trained on that stage's positive boxes, weighted like its box losses."""
        if not self.mask_on:
            return {}
        maps = [features[f] for f in self.mask_in_features]
        losses = {}
        for k, proposals in enumerate(stage_proposals):
            foreground, _ = select_foreground_proposals(proposals, self.num_classes)
            pooled = self.mask_pooler(maps, [x.proposal_boxes for x in foreground])
            loss = self.mask_head[k](pooled, foreground)["loss_mask"]
            losses[f"loss_mask_stage{k}"] = loss * self.stage_loss_weights[k]
        return losses

    def _forward_mask(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """Test time: every stage's mask head on the final boxes, mask probabilities averaged."""
        if not self.mask_on:
            return instances
        if self.training:
            raise RuntimeError("PaperCascadeROIHeads trains its mask heads in _mask_losses")
        pooled = self.mask_pooler([features[f] for f in self.mask_in_features], [x.pred_boxes for x in instances])
        probs = sum(_class_mask_probs(head.layers(pooled), instances) for head in self.mask_head)
        probs = probs / len(self.mask_head)
        for masks, instances_i in zip(probs.split([len(i) for i in instances]), instances):
            instances_i.pred_masks = masks
        return instances


def _class_mask_probs(logits: torch.Tensor, instances: List[Instances]) -> torch.Tensor:
    """``(N, 1, M, M)`` probabilities of each box's predicted class (or of the single class-agnostic mask)."""
    if logits.shape[1] == 1:
        return logits.sigmoid()
    classes = cat([i.pred_classes for i in instances])
    return logits[torch.arange(len(classes), device=logits.device), classes][:, None].sigmoid()
