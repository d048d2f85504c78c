"""The configs shipped with pvt_d2, in the form of ``detectron2.model_zoo``.

The repository's top-level ``configs/`` is the one source; the package reaches
it as ``pvt_d2/model_zoo/configs`` (a link in a checkout, copied into the
wheel by ``setup.py``), so an installed pvt_d2 has every YAML config and its
LazyConfig twin::

    from pvt_d2 import model_zoo
    model_zoo.get_config_file("retinanet_pvt_s.yaml")      # path of the file
    cfg = model_zoo.get_config("mask_rcnn_pvt_v2_b2.yaml")  # a CfgNode with pvt_d2's keys
    cfg = model_zoo.get_config("lazy/mask_rcnn_pvt_v2_b2.py")  # a LazyConfig (omegaconf DictConfig)
    model = model_zoo.get("retinanet_pvt_s.yaml")           # the detector, ImageNet backbone weights loaded

pvt_d2 publishes ImageNet backbones only, no trained detectors: a detector
comes from training one of these configs.

The configs are written from the family manifests
(:mod:`pvt_d2.modeling.backbone.manifest`) by :mod:`.generate` with the
training recipe of :mod:`.recipes`; :mod:`.table` writes ``MODEL_ZOO.md``
(``tools/generate_configs.py`` and ``tools/model_zoo.py`` run them).
"""
import os
from typing import List, Optional, Sequence

__all__ = ["CONFIG_ROOT", "get_config_file", "get_config", "get", "list_configs"]

#: Folder of the shipped configs (``<name>.yaml``, ``base/``, ``lazy/<name>.py``).
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def list_configs(lazy: bool = False) -> List[str]:
    """Names of the shipped detector configs: ``"retinanet_pvt_s.yaml"``, ... (``lazy``: ``"lazy/....py"``)."""
    if lazy:
        return sorted(f"lazy/{f}" for f in os.listdir(os.path.join(CONFIG_ROOT, "lazy")) if f.endswith(".py"))
    return sorted(f for f in os.listdir(CONFIG_ROOT) if f.endswith(".yaml"))


def get_config_file(config_path: str) -> str:
    """The path of a shipped config.

    Args:
        config_path: name relative to the config folder, e.g. ``"retinanet_pvt_s.yaml"``,
            ``"lazy/mask_rcnn_pvt_v2_b2.py"``; a leading ``"configs/"`` is accepted.

    Raises:
        FileNotFoundError: no such config (the message names close matches).
    """
    name = config_path[len("configs/"):] if config_path.startswith("configs/") else config_path
    path = os.path.join(CONFIG_ROOT, name)
    if not os.path.isfile(path):
        import difflib

        known = list_configs() + list_configs(lazy=True)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see pvt_d2.model_zoo.list_configs()"
        raise FileNotFoundError(f"{config_path} is not a pvt_d2 model zoo config{hint}")
    return path


def get_config(config_path: str, overrides: Optional[Sequence[str]] = None):
    """A shipped config, loaded.

    Args:
        config_path: as :func:`get_config_file`.
        overrides: YAML: ``["KEY", "VALUE", ...]``; LazyConfig: ``["a.b=value", ...]``.

    Returns:
        A detectron2 ``CfgNode`` with pvt_d2's keys (``.yaml``, read by
        :func:`pvt_d2.config.load_config`), or the LazyConfig root
        (``.py``, read by detectron2's ``LazyConfig.load``).
    """
    path = get_config_file(config_path)
    if path.endswith(".py"):
        from detectron2.config import LazyConfig

        cfg = LazyConfig.load(path)
        return LazyConfig.apply_overrides(cfg, list(overrides or []))
    from ..config import load_config

    return load_config(path, list(overrides or []))


def get(config_path: str, trained: bool = False, device: Optional[str] = None,
        overrides: Optional[Sequence[str]] = None):
    """The detector a shipped config describes, built as every detectron2 client builds it.

    The backbone's ImageNet weights (``MODEL.PVT_D2.PRETRAINED`` / the
    LazyConfig backbone's ``pretrained``) are loaded while building, downloaded
    once into the cache; pass ``overrides=["MODEL.PVT_D2.PRETRAINED", ""]`` (or
    ``["model.backbone.bottom_up.pretrained=''"]``) for a random-init backbone.

    Args:
        config_path: as :func:`get_config_file`.
        trained: accepted for detectron2's signature; pvt_d2 publishes no
            trained detectors, so True raises.
        device: ``"cpu"``, ``"cuda"``, ...; default: CUDA if available.
        overrides: as :func:`get_config`.

    Raises:
        ValueError: ``trained=True``.
    """
    if trained:
        raise ValueError("pvt_d2 publishes ImageNet backbones only, no trained detectors: train "
                         f"{config_path} (pvt-d2-train) and load the result with MODEL.WEIGHTS")
    import torch

    cfg = get_config(config_path, overrides)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config_path.endswith(".py"):
        from detectron2.config import instantiate

        return instantiate(cfg.model).to(device)
    from detectron2.modeling import build_model

    cfg.MODEL.DEVICE = device
    return build_model(cfg)
