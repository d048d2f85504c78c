#!/usr/bin/env python
"""Write the per-variant detector configs under ``configs/`` from one table.

Every variant gets one file per detector, named with its short name:
``retinanet_<short>.yaml`` (1x), ``mask_rcnn_<short>.yaml`` (1x),
``faster_rcnn_<short>.yaml`` (1x), ``mask_rcnn_<short>_3x.yaml`` and
``cascade_mask_rcnn_<short>_3x.yaml``. Each file states the whole training
recipe of the papers' official configs (:func:`recipe`; the reasons are in
``docs/RECIPES.md``) and the backbone's ImageNet checkpoint
(:func:`pvt_d2.checkpoint.sources.pretrained_url`). Adding a family means adding its rows
to ``VARIANTS`` and running::

    python tools/generate_configs.py          # write
    python tools/generate_configs.py --check  # fail if a file is stale
"""
import argparse
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from pvt_d2.checkpoint.sources import pretrained_url

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")

DETECTORS = {
    # file prefix / suffix -> base config
    ("retinanet_", ""): "base/retinanet_1x.yaml",
    ("mask_rcnn_", ""): "base/mask_rcnn_1x.yaml",
    ("faster_rcnn_", ""): "base/faster_rcnn_1x.yaml",
    ("mask_rcnn_", "_3x"): "base/mask_rcnn_3x.yaml",
    ("cascade_mask_rcnn_", "_3x"): "base/cascade_mask_rcnn_3x.yaml",
}

# COCO train2017 images with at least one annotation (both mmdetection and
# detectron2 drop the others in training), and the iterations of one epoch.
COCO_TRAIN_IMAGES = 117266


def iters_per_epoch(batch: int) -> int:
    """Iterations of one COCO train2017 epoch at ``batch`` images (7,330 at batch 16)."""
    return math.ceil(COCO_TRAIN_IMAGES / batch)


# (epochs, lr-step epochs) of the papers' schedules: mmdetection's 1x and 3x.
SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}

# short name, architecture, family, drop path of the official detection backbone.
VARIANTS: List[Tuple[str, str, str, float]] = [
    ("pvt_t", "pvt_tiny", "pvt", 0.1),
    ("pvt_s", "pvt_small", "pvt", 0.1),
    ("pvt_m", "pvt_medium", "pvt", 0.0),  # whai362/PVT detection/pvt.py: pvt_medium / pvt_large set no drop path
    ("pvt_l", "pvt_large", "pvt", 0.0),
    ("pvt_v2_b0", "pvt_v2_b0", "pvt_v2", 0.1),
    ("pvt_v2_b1", "pvt_v2_b1", "pvt_v2", 0.1),
    ("pvt_v2_b2", "pvt_v2_b2", "pvt_v2", 0.1),
    ("pvt_v2_b2_li", "pvt_v2_b2_li", "pvt_v2", 0.1),
    ("pvt_v2_b3", "pvt_v2_b3", "pvt_v2", 0.1),
    ("pvt_v2_b4", "pvt_v2_b4", "pvt_v2", 0.1),
    ("pvt_v2_b5", "pvt_v2_b5", "pvt_v2", 0.1),
    ("twins_pcpvt_s", "twins_pcpvt_small", "twins", 0.2),  # Twins detection/gvt.py: 0.2 for every variant
    ("twins_pcpvt_b", "twins_pcpvt_base", "twins", 0.2),
    ("twins_pcpvt_l", "twins_pcpvt_large", "twins", 0.2),
    ("twins_svt_s", "twins_svt_small", "twins", 0.2),
    ("twins_svt_b", "twins_svt_base", "twins", 0.2),
    ("twins_svt_l", "twins_svt_large", "twins", 0.2),
    ("gcvit_xxt", "gcvit_xxtiny", "gcvit", 0.2),
    ("gcvit_xt", "gcvit_xtiny", "gcvit", 0.2),
    ("gcvit_t", "gcvit_tiny", "gcvit", 0.2),  # NVlabs/GCVit gcvit/*_gcvit_tiny_3x_coco.py
    ("gcvit_s", "gcvit_small", "gcvit", 0.3),
    ("gcvit_b", "gcvit_base", "gcvit", 0.5),
    ("levit_128s", "levit_128s", "levit", 0.0),
    ("levit_128", "levit_128", "levit", 0.0),
    ("levit_192", "levit_192", "levit", 0.0),
    ("levit_256", "levit_256", "levit", 0.0),
    ("levit_384", "levit_384", "levit", 0.1),
    ("vip_s14", "vip_s14", "vip", 0.1),
    ("vip_s7", "vip_s7", "vip", 0.1),
    ("vip_m7", "vip_m7", "vip", 0.1),
    ("vip_l7", "vip_l7", "vip", 0.1),
]

# 1x configs the papers trained with 1 image per GPU on 8 GPUs (batch 8) and
# the learning rate divided by 1.4 (whai362/PVT detection/configs, samples_per_gpu=1).
SMALL_BATCH_1X = {
    ("pvt_large", "mask_rcnn_1x"),
    ("pvt_v2_b4", "retinanet_1x"), ("pvt_v2_b4", "mask_rcnn_1x"),
    ("pvt_v2_b5", "retinanet_1x"), ("pvt_v2_b5", "mask_rcnn_1x"),
}


def detector_key(base: str) -> str:
    """``"base/mask_rcnn_3x.yaml"`` -> ``"mask_rcnn_3x"``."""
    return os.path.splitext(os.path.basename(base))[0]


def recipe(arch: str, family: str, detector: str) -> Dict[str, Any]:
    """The solver settings of one detector config: the papers' mmdetection recipe.

    * AdamW, lr 1e-4 (RetinaNet, 3x) or 2e-4 (Mask / Faster R-CNN 1x) at batch 16;
      weight decay 1e-4 (1x) or 0.05 (3x).
    * 12 epochs with lr steps at 8 and 11 (1x), 36 with steps at 27 and 33 (3x),
      counted in iterations of :func:`iters_per_epoch`.
    * Linear warmup of 500 iterations; 2500 for GC ViT's 3x (its ``schedule_3x.py``).
    * :data:`SMALL_BATCH_1X`: batch 8 and lr / 1.4, the epochs unchanged.
    """
    schedule = detector.rsplit("_", 1)[-1]
    epochs, steps = SCHEDULES[schedule]
    batch = 16
    lr = 2e-4 if detector in ("mask_rcnn_1x", "faster_rcnn_1x") else 1e-4
    if (arch, detector) in SMALL_BATCH_1X:
        batch, lr = 8, lr / 1.4
    per_epoch = iters_per_epoch(batch)
    return {
        "BASE_LR": lr,
        "WEIGHT_DECAY": 1e-4 if schedule == "1x" else 0.05,
        "IMS_PER_BATCH": batch,
        "MAX_ITER": epochs * per_epoch,
        "STEPS": tuple(s * per_epoch for s in steps),
        "WARMUP_ITERS": 2500 if family == "gcvit" and schedule == "3x" else 500,
    }


# Official config followed by each (family, detector); "{v}" is the variant's name in that repository.
_PVT = "whai362/PVT detection/configs/"
_TWINS = "Meituan-AutoML/Twins detection/configs/"
_GCVIT = "NVlabs/GCVit detection/configs/gcvit/"
_OFFICIAL = {
    ("pvt", "retinanet_1x"): _PVT + "retinanet_{v}_fpn_1x_coco.py",
    ("pvt", "mask_rcnn_1x"): _PVT + "mask_rcnn_{v}_fpn_1x_coco.py",
    ("pvt_v2", "retinanet_1x"): _PVT + "retinanet_{v}_fpn_1x_coco.py",
    ("pvt_v2", "mask_rcnn_1x"): _PVT + "mask_rcnn_{v}_fpn_1x_coco.py",
    ("twins", "retinanet_1x"): _TWINS + "retinanet_{v}_fpn_1x_coco_pvt_setting.py",
    ("twins", "mask_rcnn_1x"): _TWINS + "mask_rcnn_{v}_fpn_1x_coco_pvt_setting.py",
    ("twins", "mask_rcnn_3x"): _TWINS + "mask_rcnn_{v}_fpn_3x_coco_swin_setting.py",
}
# Variants with their own official file for a detector that the table above does not cover.
_OFFICIAL_ONLY = {
    ("pvt_v2_b2", "mask_rcnn_3x"): _PVT + "mask_rcnn_pvt_v2_b2_fpn_3x_mstrain.py",
    ("pvt_v2_b2_li", "mask_rcnn_3x"): _PVT + "mask_rcnn_pvt_v2_b2_li_fpn_3x_mstrain.py",
    ("pvt_v2_b2", "cascade_mask_rcnn_3x"): _PVT + "cascade_mask_rcnn_pvt_v2_b2_fpn_3x_mstrain_fp16.py",
    ("pvt_v2_b2_li", "cascade_mask_rcnn_3x"): _PVT + "cascade_mask_rcnn_pvt_v2_b2_li_fpn_3x_mstrain_fp16.py",
    ("gcvit_tiny", "mask_rcnn_3x"): _GCVIT + "mask_rcnn_gcvit_tiny_3x_coco.py",
    ("gcvit_tiny", "cascade_mask_rcnn_3x"): _GCVIT + "cascade_mask_rcnn_gcvit_tiny_3x_coco.py",
}
# What a config without an official file of its own is modelled on.
_MODEL = {
    "retinanet_1x": _PVT + "retinanet_pvt_v2_b2_fpn_1x_coco.py",
    "mask_rcnn_1x": _PVT + "mask_rcnn_pvt_v2_b2_fpn_1x_coco.py",
    "faster_rcnn_1x": _PVT + "mask_rcnn_pvt_v2_b2_fpn_1x_coco.py (without the mask head)",
    "mask_rcnn_3x": _PVT + "mask_rcnn_pvt_v2_b2_fpn_3x_mstrain.py",
    "cascade_mask_rcnn_3x": _PVT + "cascade_mask_rcnn_pvt_v2_b2_fpn_3x_mstrain_fp16.py",
}
_FAMILY_MODEL = {("gcvit", "mask_rcnn_3x"): _GCVIT + "mask_rcnn_gcvit_tiny_3x_coco.py",
                 ("gcvit", "cascade_mask_rcnn_3x"): _GCVIT + "cascade_mask_rcnn_gcvit_tiny_3x_coco.py",
                 ("twins", "mask_rcnn_3x"): _TWINS + "mask_rcnn_pcpvt_b_fpn_3x_coco_swin_setting.py"}
# Variant names in the official repositories.
_OFFICIAL_NAMES = {
    "pvt_tiny": "pvt_t", "pvt_small": "pvt_s", "pvt_medium": "pvt_m", "pvt_large": "pvt_l",
    "twins_pcpvt_small": "pcpvt_s", "twins_pcpvt_base": "pcpvt_b", "twins_pcpvt_large": "pcpvt_l",
    "twins_svt_small": "alt_gvt_s", "twins_svt_base": "alt_gvt_b", "twins_svt_large": "alt_gvt_l",
}
# Official files that do not exist although the pattern above would name them.
_MISSING = {(_TWINS + "mask_rcnn_pcpvt_l_fpn_3x_coco_swin_setting.py")}


def official_config(arch: str, family: str, detector: str) -> Tuple[Optional[str], str]:
    """``(official file followed or None, what the config is modelled on)`` for one detector config."""
    path = _OFFICIAL_ONLY.get((arch, detector))
    if path is None and (family, detector) in _OFFICIAL:
        path = _OFFICIAL[(family, detector)].format(v=_OFFICIAL_NAMES.get(arch, arch))
        if path in _MISSING:
            path = None
    if path is not None:
        return path, path
    return None, _FAMILY_MODEL.get((family, detector), _MODEL[detector])


def _number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def render(short: str, arch: str, family: str, drop_path: float, base: str) -> str:
    """The YAML text of one config."""
    detector = detector_key(base)
    official, model = official_config(arch, family, detector)
    solver = recipe(arch, family, detector)
    lines = ["# Generated by tools/generate_configs.py; edit the table there, not this file.",
             f"# Follows {official}." if official else f"# No official config: modelled on {model}.",
             "# Recipe and deliberate differences: docs/RECIPES.md.",
             f'_BASE_: "{base}"',
             "MODEL:",
             "  PVT_D2:",
             f'    ARCH: "{arch}"',
             f"    DROP_PATH_RATE: {drop_path}",
             f'    PRETRAINED: "{pretrained_url(arch)}"',
             "SOLVER:"]
    for key, value in solver.items():
        text = f"({', '.join(str(v) for v in value)})" if isinstance(value, tuple) else _number(value)
        lines.append(f"  {key}: {text}")
    lines.append(f'OUTPUT_DIR: "./output/{detector}_{short}"')
    return "\n".join(lines) + "\n"


def expected_files() -> Dict[str, str]:
    """File name -> content for every generated config."""
    files = {}
    for short, arch, family, drop_path in VARIANTS:
        for (prefix, suffix), base in DETECTORS.items():
            files[f"{prefix}{short}{suffix}.yaml"] = render(short, arch, family, drop_path, base)
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report files that differ from the table")
    args = parser.parse_args(argv)
    stale = []
    for name, text in expected_files().items():
        path = os.path.join(CONFIG_DIR, name)
        current = open(path).read() if os.path.exists(path) else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            with open(path, "w") as f:
                f.write(text)
    if args.check and stale:
        print("stale or missing configs: " + ", ".join(stale))
        return 1
    print(f"{len(expected_files())} configs, {len(stale)} {'stale' if args.check else 'written'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
