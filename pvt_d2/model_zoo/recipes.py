"""The training recipe of the detector configs: the papers' mmdetection settings, per detector and family.

Every generated config (:mod:`.generate`) states the whole recipe of the
official config it follows (the reasons and the deliberate differences are in
``docs/RECIPES.md``). The common recipe is here; what differs by family or
variant is read from its manifest (:mod:`pvt_d2.modeling.backbone.manifest`):
:attr:`~pvt_d2.modeling.backbone.manifest.FamilyManifest.recipe`,
:attr:`~pvt_d2.modeling.backbone.manifest.Variant.small_batch` and the
official config files.
"""
import math
import os
from typing import Any, Dict, Optional, Tuple

from ..modeling.backbone.manifest import get_variant

__all__ = [
    "DETECTORS",
    "COCO_TRAIN_IMAGES",
    "SCHEDULES",
    "MODELLED_ON",
    "config_name",
    "detector_key",
    "iters_per_epoch",
    "official_config",
    "recipe",
]

#: (file prefix, file suffix) of a variant's config -> its base config under ``configs/``.
DETECTORS = {
    ("retinanet_", ""): "base/retinanet_1x.yaml",
    ("mask_rcnn_", ""): "base/mask_rcnn_1x.yaml",
    ("faster_rcnn_", ""): "base/faster_rcnn_1x.yaml",
    ("mask_rcnn_", "_3x"): "base/mask_rcnn_3x.yaml",
    ("cascade_mask_rcnn_", "_3x"): "base/cascade_mask_rcnn_3x.yaml",
}

#: COCO train2017 images with at least one annotation (both mmdetection and
#: detectron2 drop the others in training).
COCO_TRAIN_IMAGES = 117266

#: (epochs, lr-step epochs) of the papers' schedules: mmdetection's 1x and 3x.
SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}

_PVT = "whai362/PVT detection/configs/"
#: What a config without an official file of its own is modelled on, unless its family says otherwise.
MODELLED_ON = {
    "retinanet_1x": _PVT + "retinanet_pvt_v2_b2_fpn_1x_coco.py",
    "mask_rcnn_1x": _PVT + "mask_rcnn_pvt_v2_b2_fpn_1x_coco.py",
    "faster_rcnn_1x": _PVT + "mask_rcnn_pvt_v2_b2_fpn_1x_coco.py (without the mask head)",
    "mask_rcnn_3x": _PVT + "mask_rcnn_pvt_v2_b2_fpn_3x_mstrain.py",
    "cascade_mask_rcnn_3x": _PVT + "cascade_mask_rcnn_pvt_v2_b2_fpn_3x_mstrain_fp16.py",
}


def iters_per_epoch(batch: int) -> int:
    """Iterations of one COCO train2017 epoch at ``batch`` images (7,330 at batch 16)."""
    return math.ceil(COCO_TRAIN_IMAGES / batch)


def detector_key(base: str) -> str:
    """``"base/mask_rcnn_3x.yaml"`` -> ``"mask_rcnn_3x"``."""
    return os.path.splitext(os.path.basename(base))[0]


def config_name(short: str, detector: str) -> str:
    """Config name of a variant's detector: ``("pvt_s", "mask_rcnn_3x")`` -> ``"mask_rcnn_pvt_s_3x"``."""
    for (prefix, suffix), base in DETECTORS.items():
        if detector_key(base) == detector:
            return f"{prefix}{short}{suffix}"
    raise KeyError(f"no detector '{detector}'; known: {', '.join(detector_key(b) for b in DETECTORS.values())}")


def recipe(arch: str, detector: str) -> Dict[str, Any]:
    """The solver settings of one detector config: the papers' mmdetection recipe.

    * AdamW, lr 1e-4 (RetinaNet, 3x) or 2e-4 (Mask / Faster R-CNN 1x) at batch 16;
      weight decay 1e-4 (1x) or 0.05 (3x).
    * 12 epochs with lr steps at 8 and 11 (1x), 36 with steps at 27 and 33 (3x),
      counted in iterations of :func:`iters_per_epoch`.
    * Linear warmup of 500 iterations.
    * The variant's ``small_batch`` detectors: batch 8 and lr / 1.4, the epochs unchanged.
    * Then the family's ``recipe`` keys for the schedule (GC ViT's 3x: warmup 2500).

    Args:
        arch: registered architecture name.
        detector: ``"retinanet_1x"``, ``"mask_rcnn_3x"``, ... (:func:`detector_key`).
    """
    family, variant = get_variant(arch)
    schedule = detector.rsplit("_", 1)[-1]
    epochs, steps = SCHEDULES[schedule]
    batch = 16
    lr = 2e-4 if detector in ("mask_rcnn_1x", "faster_rcnn_1x") else 1e-4
    if detector in variant.small_batch:
        batch, lr = 8, lr / 1.4
    per_epoch = iters_per_epoch(batch)
    solver = {
        "BASE_LR": lr,
        "WEIGHT_DECAY": 1e-4 if schedule == "1x" else 0.05,
        "IMS_PER_BATCH": batch,
        "MAX_ITER": epochs * per_epoch,
        "STEPS": tuple(s * per_epoch for s in steps),
        "WARMUP_ITERS": 500,
    }
    solver.update(family.recipe.get(schedule, {}))
    return solver


def official_config(arch: str, detector: str) -> Tuple[Optional[str], str]:
    """``(official file followed or None, what the config is modelled on)`` for one detector config."""
    family, variant = get_variant(arch)
    if detector in variant.official_configs:
        path = variant.official_configs[detector]
    elif detector in family.official_configs:
        path = family.official_configs[detector].format(v=variant.official_name)
    else:
        path = None
    if path is not None:
        return path, path
    return None, family.modelled_on.get(detector, MODELLED_ON[detector])
