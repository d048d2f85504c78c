"""Config keys added by pvt_d2 on top of detectron2's defaults.

Call :func:`add_pvt_d2_config` on a detectron2 config before merging one of the
YAML files under ``configs/``. Every key is documented where it is defined.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_pvt_d2_config", "get_pvt_d2_cfg"]


def add_pvt_d2_config(cfg: CN) -> CN:
    """Add the ``MODEL.PVT_D2`` namespace and the training extras; returns ``cfg``."""
    cfg.MODEL.PVT_D2 = CN()
    # Variant name, e.g. "pvt_small", "pvt_v2_b2", "twins_svt_small", "gcvit_tiny".
    cfg.MODEL.PVT_D2.ARCH = "pvt_v2_b0"
    # Pyramid levels returned by the backbone (res2..res5 at strides 4..32).
    cfg.MODEL.PVT_D2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth: the rate of the last block, linearly increasing from 0.
    cfg.MODEL.PVT_D2.DROP_PATH_RATE = 0.1
    # Extra LayerNorm on every returned level.
    cfg.MODEL.PVT_D2.OUTPUT_NORM = False
    # ImageNet checkpoint (official or timm layout) loaded into the backbone
    # when the model is built; "" = none. MODEL.WEIGHTS, if set, loads after it.
    cfg.MODEL.PVT_D2.PRETRAINED = ""

    # GC ViT: window side per stage ([] = the ImageNet windows 7, 7, 14, 7).
    cfg.MODEL.PVT_D2.GCVIT = CN()
    cfg.MODEL.PVT_D2.GCVIT.WINDOW_SIZES = [24, 24, 24, 24]

    # LeViT: "window" (attention inside tiles of the pretraining grid) or
    # "global" (whole map, bias table extended); norm "FrozenBN", "BN" or "SyncBN".
    cfg.MODEL.PVT_D2.LEVIT = CN()
    cfg.MODEL.PVT_D2.LEVIT.ATTN_MODE = "window"
    cfg.MODEL.PVT_D2.LEVIT.NORM = "FrozenBN"

    # Optimizer: AdamW ("ADAMW") or detectron2's SGD ("SGD").
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    return cfg


def get_pvt_d2_cfg() -> CN:
    """A fresh detectron2 default config with the pvt_d2 keys added."""
    from detectron2.config import get_cfg

    return add_pvt_d2_config(get_cfg())
