"""Config keys added by pvt_d2 on top of detectron2's defaults.

Call :func:`add_pvt_d2_config` on a detectron2 config before merging one of the
YAML files under ``configs/``. Every key is documented where it is defined.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_pvt_d2_config", "get_pvt_d2_cfg", "load_config", "ConfigError"]


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
    # With AdamW, gradient clipping (when enabled) clips the norm of all
    # gradients together, as the papers' mmdetection recipes do.
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    return cfg


def get_pvt_d2_cfg() -> CN:
    """A fresh detectron2 default config with the pvt_d2 keys added."""
    from detectron2.config import get_cfg

    return add_pvt_d2_config(get_cfg())


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names it."""


def load_config(config_file: str, opts=None) -> CN:
    """Read a pvt_d2 YAML config (with its ``_BASE_`` chain) and apply overrides.

    YAML files are parsed with the safe loader only: a file with Python object
    tags is refused, never executed.

    Args:
        config_file: path of the YAML file.
        opts: ``["KEY", "VALUE", ...]`` overrides as on the command line.

    Raises:
        ConfigError: missing file, unsafe or malformed YAML, unknown key or a
            value of the wrong type.
    """
    import os

    import yaml

    if not os.path.isfile(config_file):
        raise ConfigError(f"Config file not found: {config_file}")
    cfg = get_pvt_d2_cfg()
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(f"Config file {config_file} (or one of its _BASE_ files) contains a YAML tag that "
                          f"is not plain data and is refused for safety: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {config_file} is not valid YAML: {e}") from None
    except KeyError as e:
        raise ConfigError(f"Config file {config_file}: {e.args[0] if e.args else e}") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"Config file {config_file}: {e}") from None
    if opts:
        if len(opts) % 2:
            raise ConfigError(f"Overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
        try:
            cfg.merge_from_list(list(opts))
        except KeyError as e:
            raise ConfigError(f"Unknown config key in overrides: {e.args[0] if e.args else e}") from None
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"Bad override value: {e}") from None
    return cfg
