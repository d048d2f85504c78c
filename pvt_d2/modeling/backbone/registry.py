"""How an architecture name in a config becomes a backbone.

Each family file's manifest (:func:`~.manifest.register_family`) registers its
variants with :func:`register_architectures`, mapping a name such as
``"pvt_small"`` to its model class and constructor arguments. A config
names one with ``MODEL.PVT_D2.ARCH``; the detectron2 builders at the bottom
of this file (``MODEL.BACKBONE.NAME``) turn the config into the plain backbone,
an FPN (P2-P6) or a RetinaNet FPN (P3-P7).
"""
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Optional, Tuple, Type

import fvcore.nn.weight_init as weight_init
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

__all__ = [
    "ArchSpec",
    "register_architectures",
    "unregister_architectures",
    "get_arch",
    "list_architectures",
    "create_backbone",
    "load_imagenet_weights",
    "config_optimizers",
    "backbone_kwargs_from_cfg",
    "build_pvt_d2_backbone",
    "build_pvt_d2_fpn_backbone",
    "build_pvt_d2_retinanet_fpn_backbone",
    "LastLevelP6P7FromC5",
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
        model_cls: a :class:`PyramidBackbone` subclass, optionally with a
            ``family_kwargs_from_cfg(cfg)`` classmethod returning the keyword
            arguments of its family's ``MODEL.PVT_D2.<FAMILY>`` keys (None = unset).
        archs: variant name to constructor keyword arguments.
    """
    for name, kwargs in archs.items():
        if name in _ARCHS:
            raise KeyError(f"architecture '{name}' is registered twice")
        _ARCHS[name] = ArchSpec(name, family, model_cls, dict(kwargs))


def unregister_architectures(family: str) -> None:
    """Forget every variant of ``family`` (see :func:`~.manifest.unregister_family`)."""
    for name in [n for n, s in _ARCHS.items() if s.family == family]:
        del _ARCHS[name]


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
    ``drop_path_rate``, ``freeze_at``, ...); ``act_checkpoint=True`` turns on
    activation checkpointing (:meth:`~.base.PyramidBackbone.set_act_checkpoint`),
    ``fast_inference=False`` leaves out the CPU inference kernels that change
    float32 rounding (:func:`pvt_d2.inference.prepare_for_inference`), ``pretrained``
    (a file or URL, ``MODEL.PVT_D2.PRETRAINED``) loads ImageNet weights.
    """
    spec = get_arch(name)
    act_checkpoint = kwargs.pop("act_checkpoint", False)
    fast_inference = kwargs.pop("fast_inference", True)
    pretrained = kwargs.pop("pretrained", "")
    model = spec.model_cls(**{**spec.kwargs, **kwargs})
    load_imagenet_weights(model, pretrained)
    return _prepared(model.set_act_checkpoint(act_checkpoint), fast_inference)


def load_imagenet_weights(backbone, pretrained: str) -> None:
    """Load ``pretrained`` (``MODEL.PVT_D2.PRETRAINED``: a checkpoint file or URL; ``""``: none) into ``backbone``.

    Every way of building a model from a pvt_d2 config passes here: our
    trainer, detectron2's ``DefaultTrainer`` / ``DefaultPredictor`` /
    ``build_model`` (the builders below) and LazyConfig's ``instantiate``
    (:func:`create_backbone`), so each starts from the same weights.
    """
    if pretrained:
        # imported here: pvt_d2.checkpoint reads the families' mappings from this package
        from ...checkpoint import load_pretrained_backbone

        load_pretrained_backbone(backbone, pretrained)


def backbone_kwargs_from_cfg(cfg, in_chans: int) -> Tuple[Type, Dict[str, Any]]:
    """``(model class, constructor arguments)`` of the backbone that ``cfg`` describes.

    The variant's own arguments, overridden only by the ``MODEL.PVT_D2`` keys
    that are set: a key left at ``None`` (``DROP_PATH_RATE``, the family
    options returned by the class's ``family_kwargs_from_cfg``) keeps the
    variant's value.
    """
    spec = get_arch(cfg.MODEL.PVT_D2.ARCH)
    kwargs = dict(spec.kwargs)
    kwargs.update(in_chans=in_chans, out_features=list(cfg.MODEL.PVT_D2.OUT_FEATURES),
                  output_norm=cfg.MODEL.PVT_D2.OUTPUT_NORM, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
    if cfg.MODEL.PVT_D2.DROP_PATH_RATE is not None:
        kwargs["drop_path_rate"] = cfg.MODEL.PVT_D2.DROP_PATH_RATE
    family_kwargs = getattr(spec.model_cls, "family_kwargs_from_cfg", None)
    if family_kwargs is not None:
        kwargs.update({k: v for k, v in family_kwargs(cfg).items() if v is not None})
    return spec.model_cls, kwargs


def _backbone_from_cfg(cfg, input_shape: ShapeSpec):
    """The backbone of ``cfg``; with ``MODEL.PVT_D2.PRETRAINED`` its ImageNet weights, unless ``MODEL.WEIGHTS``
    names the weights of the whole detector (which replace them: nothing is fetched)."""
    model_cls, kwargs = backbone_kwargs_from_cfg(cfg, input_shape.channels)
    model = model_cls(**kwargs)
    if not cfg.MODEL.WEIGHTS:
        load_imagenet_weights(model, cfg.MODEL.PVT_D2.PRETRAINED)
    model = _prepared(model.set_act_checkpoint(cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT), cfg.MODEL.PVT_D2.FAST_INFERENCE)
    _CONFIG_OPTIMIZER[model] = cfg.SOLVER.get("OPTIMIZER", "SGD").upper()
    return model


def _prepared(model, fast_inference: bool):
    """``model`` with the CPU inference kernels swapped in when ``fast_inference`` (``MODEL.PVT_D2.FAST_INFERENCE``)."""
    from ...inference import prepare_for_inference  # the engine builds on the models, not the other way round

    return prepare_for_inference(model) if fast_inference else model


# Backbones built from a config -> the config's SOLVER.OPTIMIZER, which pvt_d2.engine.optim checks at the first
# step of an optimizer that trains them (detectron2's DefaultTrainer would otherwise build SGD without a word).
_CONFIG_OPTIMIZER: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def config_optimizers() -> Iterator[Tuple[nn.Module, str]]:
    """``(backbone, SOLVER.OPTIMIZER)`` of every live backbone that a detectron2 builder made from a config."""
    return iter(list(_CONFIG_OPTIMIZER.items()))


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


class LastLevelP6P7FromC5(nn.Module):
    """RetinaNet's P6 and P7: P6 = 3x3 stride-2 conv on the backbone's ``res5``, P7 = the same on P6.

    The FPN of the papers' RetinaNet configs (mmdetection ``FPN`` with
    ``add_extra_convs='on_input'`` and the default ``relu_before_extra_convs=False``).
    detectron2's ``LastLevelP6P7`` puts a ReLU between P6 and P7; this block does not.
    """

    def __init__(self, in_channels: int, out_channels: int, in_feature: str = "res5"):
        super().__init__()
        self.num_levels = 2
        self.in_feature = in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=2, padding=1)
        for conv in (self.p6, self.p7):
            weight_init.c2_xavier_fill(conv)

    def forward(self, c5):
        p6 = self.p6(c5)
        return [p6, self.p7(p6)]


@BACKBONE_REGISTRY.register()
def build_pvt_d2_retinanet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Backbone + FPN with P3-P7 for RetinaNet: P6 from ``res5`` (C5), P7 from P6, no ReLU between."""
    bottom_up = _backbone_from_cfg(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    in_feature = cfg.MODEL.FPN.IN_FEATURES[-1]
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7FromC5(bottom_up.output_shape()[in_feature].channels, out_channels, in_feature),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
