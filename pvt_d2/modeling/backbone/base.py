"""The detectron2 ``Backbone`` contract shared by every family.

A family model subclasses :class:`PyramidBackbone`, describes its pyramid
levels (name, channels, stride) and implements :meth:`forward_features`, which
returns every level it computes. The base class takes care of the rest:
``out_features`` selection and validation, ``output_shape()``, optional
LayerNorm on each output, input validation, ``FREEZE_AT`` semantics
(frozen modules stay frozen and in eval mode after ``model.train()``) and
activation checkpointing (:meth:`PyramidBackbone.set_act_checkpoint`).

Activation checkpointing follows timm's ``set_grad_checkpointing`` and
detectron2 ViT's ``use_act_checkpoint``: a block's activations are not kept
for the backward pass but recomputed there, trading about one extra forward
of the blocks for the memory of their intermediate activations. A family opts
its block classes in with a class attribute ``act_checkpoint = False`` and
calls them through :func:`checkpoint_block`; the recomputation uses
non-reentrant :func:`torch.utils.checkpoint.checkpoint`, which restores the
RNG state, so stochastic depth and dropout draw the same masks twice.
BatchNorm layers in training mode would update their running statistics a
second time during recomputation; no checkpointed block of pvt_d2 has one in
training mode by default (LeViT's default norm is frozen).
"""
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from timm.layers import calculate_drop_path_rates
from torch import nn
from torch.utils.checkpoint import checkpoint

from .export_ops import to_contiguous
from .layers import LayerNorm2d

__all__ = [
    "PyramidBackbone",
    "LEVEL_NAMES",
    "LEVEL_STRIDES",
    "DEFAULT_OUT_FEATURES",
    "checkpoint_block",
    "drop_path_rates",
]

#: The pyramid levels, finest first, named as detectron2's ResNet names them:
#: ``res{k}`` has stride ``2 ** k``.
LEVEL_NAMES = ("res2", "res3", "res4", "res5", "res6")
LEVEL_STRIDES = {name: 2 ** int(name[3:]) for name in LEVEL_NAMES}
#: The levels a backbone returns unless told otherwise (strides 4 to 32).
DEFAULT_OUT_FEATURES = LEVEL_NAMES[:4]


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> List[List[float]]:
    """Stochastic-depth rate of every residual block, split by stage.

    The rate rises linearly from 0 at the first block to ``drop_path_rate`` at
    the last one, counted over all blocks of all stages (float32
    ``torch.linspace`` on the CPU, so building on the meta device works too);
    this is timm's ``calculate_drop_path_rates(..., stagewise=True)``.

    Args:
        drop_path_rate: rate of the last block.
        depths: number of residual blocks of each stage.
    """
    return calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=True)


def checkpoint_block(block: nn.Module, *args, **kwargs):
    """``block(*args, **kwargs)``, recomputed in backward when activation checkpointing is on.

    Checkpointing applies only when ``block.act_checkpoint`` is set (see
    :meth:`PyramidBackbone.set_act_checkpoint`), the block is in training
    mode and autograd is recording; otherwise this is a plain call.
    """
    if getattr(block, "act_checkpoint", False) and block.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
    return block(*args, **kwargs)


class PyramidBackbone(Backbone):
    """Base class of all pvt_d2 backbones.

    Subclasses call :meth:`_init_pyramid` at the end of their ``__init__`` and
    implement :meth:`forward_features` and :meth:`frozen_modules`.

    Images of any size are accepted; each family pads internally where its
    operators need it, so a level at stride ``s`` has ``ceil(H / s)`` by
    ``ceil(W / s)`` positions. Consequently the backbone itself needs no input
    divisibility (``size_divisibility == 0``); an FPN on top of it asks for
    its own (32, or 128 with P6/P7) as usual.
    """

    # Substrings of the names of learned tables (position embeddings, PEG convs,
    # attention-bias tables) that the papers train without weight decay; see
    # :meth:`no_weight_decay`.
    no_weight_decay_keywords: Tuple[str, ...] = ()

    def no_weight_decay(self) -> Set[str]:
        """Names of the parameters to train without weight decay (timm's ``no_weight_decay()`` convention).

        The parameters whose name contains one of :attr:`no_weight_decay_keywords`.
        The optimizer (``pvt_d2.engine.optim``) also exempts every parameter with
        at most one dimension (norms, biases).
        """
        return {n for n, _ in self.named_parameters() if any(k in n for k in self.no_weight_decay_keywords)}

    #: Whether the blocks are recomputed in backward; see :meth:`set_act_checkpoint`.
    act_checkpoint: bool = False

    def set_act_checkpoint(self, enabled: bool = True) -> "PyramidBackbone":
        """Turn activation checkpointing of every transformer / MLP block on or off.

        It takes effect only in training mode with autograd recording
        (``model.eval()`` and ``torch.no_grad()`` run the blocks plainly) and
        changes no result: gradients equal those without it (up to float
        rounding of the recomputation, bit-identical in practice).
        ``MODEL.PVT_D2.ACTIVATION_CHECKPOINT`` and
        ``create_backbone(name, act_checkpoint=True)`` call this.

        Returns:
            ``self``.
        """
        self.act_checkpoint = bool(enabled)
        for module in self.modules():
            if module is not self and hasattr(type(module), "act_checkpoint"):
                module.act_checkpoint = bool(enabled)
        return self

    def _init_pyramid(self, channels: Union[Mapping[str, int], Sequence[int]],
                      strides: Optional[Mapping[str, int]] = None,
                      out_features: Optional[Sequence[str]] = None, output_norm: bool = False,
                      freeze_at: int = 0, min_input_size: int = 1) -> None:
        """Record the pyramid description and apply the user options.

        Args:
            channels: channels of every level the model can produce, by name,
                or as a sequence for the levels from ``res2`` on.
            strides: stride of every level, by name (default :data:`LEVEL_STRIDES`).
            out_features: levels to return (default ``res2``-``res5``).
            output_norm: add a LayerNorm on each returned level.
            freeze_at: 0 trains everything; 1 freezes the stem / patch
                embedding; ``k >= 2`` also freezes the stages up to ``res{k}``.
            min_input_size: smallest image side the model accepts.
        """
        if not isinstance(channels, Mapping):
            channels = dict(zip(LEVEL_NAMES, channels))
        strides = strides or LEVEL_STRIDES
        out_features = list(out_features or DEFAULT_OUT_FEATURES)
        unknown = [f for f in out_features if f not in channels]
        if unknown or not out_features:
            raise ValueError(
                f"{type(self).__name__}: unknown out_features {unknown or out_features}; "
                f"this backbone provides {sorted(channels)}")
        self._out_features = out_features
        self._out_feature_channels = {k: channels[k] for k in out_features}
        self._out_feature_strides = {k: strides[k] for k in out_features}
        self._min_input_size = min_input_size
        self.output_norms = nn.ModuleDict(
            {k: LayerNorm2d(channels[k], eps=1e-6) for k in out_features}) if output_norm else None
        self._freeze_at = freeze_at
        self._freeze()

    @property
    def size_divisibility(self) -> int:
        return 0

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {}

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        """Modules to freeze for a given ``FREEZE_AT`` value; see :meth:`_init_pyramid`."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Compute the levels in ``needed`` (more may be returned)."""
        raise NotImplementedError

    @staticmethod
    def run_stages(x: torch.Tensor, stages: Sequence[Callable[[torch.Tensor], torch.Tensor]], needed: Sequence[str],
                   names: Sequence[str] = LEVEL_NAMES) -> Dict[str, torch.Tensor]:
        """Run ``stages`` one after the other up to the last level in ``needed``.

        Args:
            x: input of the first stage.
            stages: the stages in order (modules or callables); stage ``i`` produces level ``names[i]``.
            needed: the levels asked for.
            names: the level of each stage (default ``res2``, ``res3``, ...).

        Returns:
            the output of every stage run, by level name.
        """
        last = max(names.index(n) for n in needed)
        out = {}
        for name, stage in zip(names[:last + 1], stages):
            x = stage(x)
            out[name] = x
        return out

    def _freeze(self) -> None:
        if self._freeze_at <= 0:
            return
        for module in self.frozen_modules(self._freeze_at):
            for p in module.parameters():
                p.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self._freeze_at > 0:
            for module in self.frozen_modules(self._freeze_at):
                module.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Args:
            x: images ``(B, C, H, W)``.

        Returns:
            dict mapping each name of ``out_features`` to its ``(B, C_k, H_k, W_k)`` map.
        """
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self._min_input_size:
            raise ValueError(
                f"{type(self).__name__}: image of {x.shape[-2]}x{x.shape[-1]} px is smaller than "
                f"the minimum of {self._min_input_size} px per side")
        feats = self.forward_features(x, self._out_features)
        # Families may keep maps channels-last internally; callers get plain NCHW tensors.
        outputs = {k: to_contiguous(feats[k]) for k in self._out_features}
        if self.output_norms is not None:
            outputs = {k: self.output_norms[k](v) for k, v in outputs.items()}
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {k: ShapeSpec(channels=self._out_feature_channels[k], stride=self._out_feature_strides[k])
                for k in self._out_features}
