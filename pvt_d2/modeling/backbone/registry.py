"""How an architecture name in a config becomes a backbone.

Each family file registers its variants with :func:`register_architectures`,
mapping a name such as ``"pvt_small"`` to its model class and constructor
arguments. A config names one with ``MODEL.PVT_D2.ARCH``; the detectron2
builders at the bottom of this file (``MODEL.BACKBONE.NAME``) turn the config
into the plain backbone, an FPN (P2-P6) or a RetinaNet FPN (P3-P7).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Type

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7

__all__ = [
    "ArchSpec",
    "register_architectures",
    "get_arch",
    "list_architectures",
    "create_backbone",
    "build_pvt_d2_backbone",
    "build_pvt_d2_fpn_backbone",
    "build_pvt_d2_retinanet_fpn_backbone",
]


@dataclass(frozen=True)
class ArchSpec:
    """One named variant: its family, model class and constructor arguments."""

    name: str
    family: str
    model_cls: Type
    kwargs: Dict[str, Any] = field(default_factory=dict)


_ARCHS: Dict[str, ArchSpec] = {}


def register_architectures(family: str, model_cls: Type, archs: Dict[str, Dict[str, Any]]) -> None:
    """Register the variants of a family.

    Args:
        family: family name (``"pvt"``, ``"pvt_v2"``, ``"twins"``, ...).
        model_cls: a :class:`PyramidBackbone` subclass with a ``from_config``
            classmethod returning its config-dependent keyword arguments.
        archs: variant name to constructor keyword arguments.
    """
    for name, kwargs in archs.items():
        if name in _ARCHS:
            raise KeyError(f"architecture '{name}' is registered twice")
        _ARCHS[name] = ArchSpec(name, family, model_cls, dict(kwargs))


def list_architectures(family: Optional[str] = None):
    """Names of all registered variants (of one family if given), sorted."""
    return sorted(n for n, s in _ARCHS.items() if family is None or s.family == family)


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``name``; an unknown name lists the valid ones."""
    try:
        return _ARCHS[name]
    except KeyError:
        raise KeyError(
            f"Unknown backbone architecture '{name}' (MODEL.PVT_D2.ARCH). "
            f"Valid names: {', '.join(list_architectures())}") from None


def create_backbone(name: str, **kwargs):
    """Build variant ``name`` directly from Python, without a config.

    Keyword arguments override or extend the variant's own (``out_features``,
    ``drop_path_rate``, ``freeze_at``, ...).
    """
    spec = get_arch(name)
    return spec.model_cls(**{**spec.kwargs, **kwargs})


def _backbone_from_cfg(cfg, input_shape: ShapeSpec):
    spec = get_arch(cfg.MODEL.PVT_D2.ARCH)
    common = dict(
        in_chans=input_shape.channels,
        out_features=list(cfg.MODEL.PVT_D2.OUT_FEATURES),
        drop_path_rate=cfg.MODEL.PVT_D2.DROP_PATH_RATE,
        output_norm=cfg.MODEL.PVT_D2.OUTPUT_NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
    family = spec.model_cls.from_config(cfg) if hasattr(spec.model_cls, "from_config") else {}
    return spec.model_cls(**{**spec.kwargs, **common, **family})


@BACKBONE_REGISTRY.register()
def build_pvt_d2_backbone(cfg, input_shape: ShapeSpec):
    """The plain backbone named by ``MODEL.PVT_D2.ARCH``."""
    return _backbone_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_pvt_d2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Backbone + FPN with P2-P6 (P6 by max-pooling P5), for R-CNN detectors."""
    bottom_up = _backbone_from_cfg(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_pvt_d2_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Backbone + FPN with P3-P7 (P6/P7 by strided convs on P5), for RetinaNet."""
    bottom_up = _backbone_from_cfg(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
