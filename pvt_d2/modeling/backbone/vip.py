"""Vision Permutator (ViP) as a detectron2 backbone for images of any size.

Architecture (Hou et al., "Vision Permutator: A Permutable MLP-Like
Architecture for Visual Recognition"): a plain ``patch x patch`` convolution
embeds the image into a channels-last token map, followed by stages of
Permutator blocks and, between some stages, a 2x2 strided convolution that
halves the map. A Permutator block is

    y = x + WeightedPermuteMLP(LN(x)) / skip_lam
    z = y + MLP(LN(y)) / skip_lam            (channel MLP, ratio 3)

and the weighted Permute-MLP encodes the map along three directions: the
channels are split into ``segment_dim`` groups of ``S = C / segment_dim``
channels; ``mlp_h`` mixes, for every column and every group, the
``H x S`` values of that column (a ``Linear(C, C)`` because ``H`` equals
``segment_dim`` at 224 px), ``mlp_w`` does the same along the rows and
``mlp_c`` is a plain channel projection. A split-attention branch (global
average pool of the sum of the three branches, MLP ``C -> C/4 -> 3C``,
softmax over the three branches per channel) weights the branches before the
output projection ``proj``.

Any input size -- the windowed permute rule. ``mlp_h`` / ``mlp_w`` can only
mix exactly ``segment_dim`` positions, the token grid of the 224 px
pretraining. Here the height (width) mixing runs over consecutive windows of
``segment_dim`` rows (columns): the map is zero-padded at the bottom (right)
to a multiple of ``segment_dim``, every window is mixed by the pretrained
layer independently, and the padding is cropped away. Padded positions only
feed zeros into the mixing of real positions. At the native grid there is a
single window and no padding, so the block is the original one; the
split-attention weights use a mean over the real positions only, which does
not depend on the size either. (:mod:`pvt_d2.inference` computes a partial
last window with the leading rows and columns of the weight instead of
materializing the padding: the same function.)

Exact strides 4, 8, 16, 32 -- input resampling and a simple feature pyramid.
The native patch strides are 7 (``vip_*7``) and 14 (``vip_s14``). The image
is zero-padded at the bottom/right to a multiple of ``grid_stride`` (8 for
patch 7, 16 for patch 14: the next power of two) and then resized bilinearly
by ``patch / grid_stride = 7/8``, to ``(ceil(H/8)*7, ceil(W/8)*7)`` for patch
7. Patch ``i`` then covers exactly the original pixels ``[8i, 8i+8)``, so the
patch grid is an exact stride-8 (stride-16) grid of the original image and
the pretrained 7x7 (14x14) patch-embedding weights load unchanged. The 2x2
downsampling zero-pads odd maps, so the stage grids are exactly
``ceil(H/s)``. Level ``res{i+2}`` (stride ``4 * 2**i``) is taken from the
output of stage ``i`` (``C_i`` channels) and brought to its stride in the
manner of a simple feature pyramid: identity when the stage already has that
stride, 2x2 stride-2 transposed convolutions (LayerNorm + GELU between two of
them) to go finer, 2x2 max pooling (ceil mode) to go coarser; the result is
cropped to ``ceil(H/stride) x ceil(W/stride)``. The transposed convolutions
are new parameters (prefix ``necks.``) that an ImageNet checkpoint lacks (the
checkpoint mapping's ``new_prefixes``).

A ``256 x 256`` image is resized to ``224 x 224`` internally, so the stages
see exactly the classifier's 224 px computation (token grid = segment_dim in
every stage); :meth:`VisionPermutator.forward_stages` runs the classifier
trunk on an already-resampled image (e.g. a 224 px ImageNet crop).

Parameter names follow the official code (``patch_embed.proj``,
``network.<i>.<j>.attn.mlp_h`` ..., ``network.<i>.proj`` for the
downsampling), so an official checkpoint loads after dropping the classifier
entries ``norm.*`` and ``head.*`` (:func:`~.key_mapping.drop_classifier_keys`).
"""
import functools
import math
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from .base import LEVEL_NAMES, LEVEL_STRIDES, PyramidBackbone, checkpoint_block, drop_path_rates
from .export_ops import crop_axis, max_pool2x2_ceil, pad_axis_to_multiple, pad_to_multiple
from .layers import LayerNorm2d, init_weights
from .key_mapping import (
    CLASSIFIER_KEY_PREFIXES,
    FamilyMapping,
    as_tuple,
    dropping,
    register_mapping,
    shape_at,
)
from .manifest import FamilyManifest, Variant, Weights, register_family

__all__ = [
    "VisionPermutator",
    "WeightedPermuteMLP",
    "PermutatorBlock",
    "PatchEmbed",
    "Downsample",
    "UpsampleNeck",
    "DownsampleNeck",
    "mix_in_windows",
    "mix_windows",
]



def mix_windows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int,
                 num_windows=None) -> torch.Tensor:
    """Mix ``(B, R, N, C)`` along ``N`` in windows of ``win = weight.shape[1] / (C / groups)`` positions.

    ``N`` must be a multiple of ``win`` (``num_windows`` of them, computed
    from ``N`` when not given). The channels are read as ``groups`` groups of
    ``S = C / groups``; within a window, the ``win x S`` values of a group
    (position-major, as in the official code) are mapped by ``weight``.
    """
    b, r, n, c = x.shape
    seg = c // groups
    win = weight.shape[1] // seg
    num_windows = n // win if num_windows is None else num_windows
    # (B, R, windows, position, group, S) -> (B, R, windows, group, position * S)
    x = x.reshape(b, r, num_windows, win, groups, seg).transpose(3, 4)
    x = F.linear(x.reshape(b, r, num_windows, groups, win * seg), weight, bias)
    x = x.reshape(b, r, num_windows, groups, win, seg).transpose(3, 4)
    return x.reshape(b, r, num_windows * win, c)


def mix_in_windows(x: torch.Tensor, proj: nn.Linear, length: int) -> torch.Tensor:
    """Permute-MLP mixing along the third axis of ``x`` in windows of ``length`` positions.

    The channels are read as ``length`` groups of ``S = C / length`` channels.
    The axis is zero-padded to a multiple of ``length``; within every window
    of ``length`` consecutive positions, the ``length x S`` values of one
    group are mixed by ``proj`` (a ``Linear(C, C)``); the padding is cropped.

    Args:
        x: ``(B, R, N, C)``; mixing runs along ``N`` independently for every
            ``R`` (use ``R = H, N = W`` for the width branch and the
            transposed map for the height branch).
        proj: the pretrained mixing layer.
        length: ``segment_dim``, the number of positions one window mixes.

    Returns:
        ``(B, R, N, C)``.
    """
    n = x.shape[2]
    out = mix_windows(pad_axis_to_multiple(x, 2, length), proj.weight, proj.bias, length, (n + length - 1) // length)
    return crop_axis(out, 2, n)


class WeightedPermuteMLP(nn.Module):
    """Permute-MLP with split-attention reweighting of its three branches.

    Args:
        dim: channels ``C``.
        segment_dim: number of channel groups, which is also the number of
            positions the height/width layers mix (the native token grid).
        qkv_bias: bias in ``mlp_c``, ``mlp_h`` and ``mlp_w`` (off in the
            official models).
    """

    def __init__(self, dim: int, segment_dim: int, qkv_bias: bool = False):
        super().__init__()
        if dim % segment_dim:
            raise ValueError(f"dim {dim} is not divisible by segment_dim {segment_dim}")
        self.segment_dim = segment_dim
        self.mlp_c = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_h = nn.Linear(dim, dim, bias=qkv_bias)
        self.mlp_w = nn.Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def mix(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """:func:`mix_in_windows` of ``x`` by ``proj`` in windows of ``segment_dim``."""
        return mix_in_windows(x, proj, self.segment_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: ``(B, H, W, C)`` of any ``H``, ``W``. Returns ``(B, H, W, C)``."""
        b, _, _, c = x.shape
        h = self.mix(x.transpose(1, 2), self.mlp_h).transpose(1, 2)
        w = self.mix(x, self.mlp_w)
        ch = self.mlp_c(x)
        pooled = (h + w + ch).mean(dim=(1, 2))
        # The reweighting output is laid out as (C, 3): one logit per channel and branch.
        weights = self.reweight(pooled).reshape(b, 1, 1, c, 3).softmax(dim=-1)
        x = h * weights[..., 0] + w * weights[..., 1] + ch * weights[..., 2]
        return self.proj(x)


class PermutatorBlock(nn.Module):
    """Pre-norm block: weighted Permute-MLP then channel MLP, residuals scaled by ``1/skip_lam``.

    Args:
        dim: channels.
        segment_dim: see :class:`WeightedPermuteMLP`.
        mlp_ratio: hidden width of the channel MLP relative to ``dim``.
        qkv_bias: bias of the three permute branches.
        drop_path: stochastic depth rate.
        skip_lam: divisor of both residual branches.
    """

    def __init__(self, dim: int, segment_dim: int, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 drop_path: float = 0.0, skip_lam: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WeightedPermuteMLP(dim, segment_dim, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_lam = skip_lam

    act_checkpoint = False  # see PyramidBackbone.set_act_checkpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x))) / self.skip_lam
        return x + self.drop_path(self.mlp(self.norm2(x))) / self.skip_lam


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` convolution to a channels-last token map."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, H / patch, W / patch, C)`` (sides divisible by the patch)."""
        return self.proj(x).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """Channels-last strided convolution between stages; odd sides are zero-padded first."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_in)`` -> ``(B, ceil(H/p), ceil(W/p), C_out)``."""
        x, _ = pad_to_multiple(x, self.patch_size, channels_last=True)
        return self.proj(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class UpsampleNeck(nn.Sequential):
    """``2**steps`` x upsampling by 2x2 stride-2 transposed convolutions (LayerNorm + GELU between)."""

    def __init__(self, dim: int, steps: int):
        layers: List[nn.Module] = []
        for i in range(steps):
            if i:
                layers += [LayerNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
        super().__init__(*layers)


class DownsampleNeck(nn.Module):
    """``2**steps`` x downsampling by 2x2 max pooling; ceil mode keeps ``ceil(n / 2)`` positions."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = max_pool2x2_ceil(x)
        return x


def _neck(dim: int, stage_stride: int, level_stride: int) -> nn.Module:
    """The module that brings a stage output at ``stage_stride`` to ``level_stride``."""
    if stage_stride == level_stride:
        return nn.Identity()
    if stage_stride > level_stride:
        return UpsampleNeck(dim, int(math.log2(stage_stride // level_stride)))
    return DownsampleNeck(int(math.log2(level_stride // stage_stride)))


class VisionPermutator(PyramidBackbone):
    """Vision Permutator backbone with ``res2``-``res5`` at strides 4, 8, 16, 32.

    See the module docstring for the any-size rule and the pyramid.

    Args:
        layers: blocks per stage.
        embed_dims: channels per stage.
        segment_dims: ``segment_dim`` per stage (its native token grid side).
        transitions: whether a 2x2 downsampling follows each stage; a 1x1
            projection is inserted instead where the width changes without one.
        patch_size: side of the patch embedding (7 or 14 in the official models).
        mlp_ratio: hidden width of the channel MLPs.
        skip_lam: divisor of the residual branches.
        qkv_bias: bias of the height/width/channel projections.
        grid_stride: stride of the patch grid relative to the input image
            (default: the smallest power of two >= ``patch_size``); the image is
            resampled by ``patch_size / grid_stride``.
        in_chans: input channels.
        drop_path_rate: stochastic depth rate of the last block (linear from 0).
        out_features: levels to return (default ``res2``-``res5``).
        output_norm: add a LayerNorm on each returned level.
        freeze_at: 1 freezes the patch embedding, ``k >= 2`` also the network up
            to the stage that produces ``res{k}``. The new necks are never frozen.
    """

    def __init__(self, layers: Sequence[int], embed_dims: Sequence[int], segment_dims: Sequence[int],
                 transitions: Sequence[bool], patch_size: int = 7, mlp_ratio: float = 3.0,
                 skip_lam: float = 1.0, qkv_bias: bool = False, grid_stride: Optional[int] = None,
                 in_chans: int = 3, drop_path_rate: float = 0.0, out_features: Optional[Sequence[str]] = None,
                 output_norm: bool = False, freeze_at: int = 0):
        super().__init__()
        num_stages = len(layers)
        if not (len(embed_dims) == len(segment_dims) == len(transitions) == num_stages == 4):
            raise ValueError("ViP needs layers, embed_dims, segment_dims and transitions for 4 stages")
        self.patch_size = patch_size
        self.grid_stride = grid_stride or 2 ** math.ceil(math.log2(patch_size))
        if self.grid_stride < patch_size or self.grid_stride & (self.grid_stride - 1):
            raise ValueError(f"grid_stride {self.grid_stride} must be a power of two >= patch_size {patch_size}")

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_size)
        dpr = drop_path_rates(drop_path_rate, layers)
        network: List[nn.Module] = []
        self._stage_positions: List[int] = []
        stage_strides: List[int] = []
        stride = self.grid_stride
        for i in range(num_stages):
            blocks = [
                PermutatorBlock(embed_dims[i], segment_dims[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                                drop_path=dpr[i][j],
                                skip_lam=skip_lam)
                for j in range(layers[i])
            ]
            self._stage_positions.append(len(network))
            network.append(nn.Sequential(*blocks))
            stage_strides.append(stride)
            if i < num_stages - 1 and (transitions[i] or embed_dims[i] != embed_dims[i + 1]):
                step = 2 if transitions[i] else 1
                network.append(Downsample(embed_dims[i], embed_dims[i + 1], step))
                stride *= step
        self.network = nn.ModuleList(network)

        names = LEVEL_NAMES[:num_stages]
        level_strides = {name: LEVEL_STRIDES[name] for name in names}
        #: stride of each stage's output (after resampling) and of each pyramid level
        self.stage_strides = dict(zip(names, stage_strides))
        self.level_strides = level_strides
        self.necks = nn.ModuleDict({
            name: _neck(embed_dims[i], stage_strides[i], level_strides[name]) for i, name in enumerate(names)})

        self.apply(init_weights)
        self._init_pyramid(dict(zip(names, embed_dims)), level_strides, out_features, output_norm,
                           freeze_at, min_input_size=1)

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        modules: List[nn.Module] = [self.patch_embed]
        if freeze_at >= 2:
            last = self._stage_positions[min(freeze_at, 5) - 2]
            modules += list(self.network[: last + 1])
        return modules

    def resample_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pad the image to a multiple of ``grid_stride`` and resize it by ``patch_size / grid_stride``.

        The patch grid of the result is an exact ``grid_stride`` grid of ``x``:
        ``(B, C, H, W)`` -> ``(B, C, ceil(H/g) * p, ceil(W/g) * p)``.
        """
        x, _ = pad_to_multiple(x, self.grid_stride)
        if self.grid_stride == self.patch_size:
            return x
        size = (x.shape[-2] // self.grid_stride * self.patch_size, x.shape[-1] // self.grid_stride * self.patch_size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def forward_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``i`` on channels-last tokens: what precedes it, then its blocks.

        What precedes stage 0 is the patch embedding (image in); what precedes
        a later stage is the downsampling / width projection in ``network``
        between the two (the official ``network`` sequence keeps the
        checkpoint layout, so a stage is this method rather than a module).
        """
        if i == 0:
            x = self.patch_embed(x)
        else:
            for module in self.network[self._stage_positions[i - 1] + 1:self._stage_positions[i]]:
                x = module(x)
        for block in self.network[self._stage_positions[i]]:
            x = checkpoint_block(block, x)
        return x

    def _trunk(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        stages = [functools.partial(self.forward_stage, i) for i in range(len(self._stage_positions))]
        return self.run_stages(x, stages, needed)

    def forward_stages(self, x: torch.Tensor, num_stages: int = 4) -> List[torch.Tensor]:
        """Run the classifier trunk (patch embedding and stages) without resampling.

        Args:
            x: image whose sides are multiples of ``patch_size`` (e.g. a 224 px
                crop, or the output of :meth:`resample_input`).
            num_stages: stop after this many stages.

        Returns:
            The channels-last ``(B, H_i, W_i, C_i)`` output of each stage run.
        """
        return list(self._trunk(x, [LEVEL_NAMES[num_stages - 1]]).values())

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        features = {}
        for name, out in self._trunk(self.resample_input(x), needed).items():
            stride = self.level_strides[name]
            y = self.necks[name](out.permute(0, 3, 1, 2))
            # ceil(H / stride) as a floor division of non-negative sizes (ONNX's Div truncates)
            features[name] = y[..., : (height + stride - 1) // stride, : (width + stride - 1) // stride]
        return features


# ---------------------------------------------------------------------------
# Checkpoints: Andrew-Qibin/VisionPermutator models/vip.py names are ours
# ---------------------------------------------------------------------------
def hparams_of_state_dict(state_dict):
    """Layers, widths and transitions from the ``network`` sequence (stages and downsamplers interleaved)."""
    sd = state_dict
    positions = sorted({int(m.group(1)) for k in sd for m in [re.match(r"network\.(\d+)\.", k)] if m})
    layers, dims, transitions = [], [], []
    for pos in positions:
        blocks = [int(m.group(1)) for k in sd for m in [re.fullmatch(rf"network\.{pos}\.(\d+)\.norm1\.weight", k)]
                  if m]
        if blocks:
            layers.append(max(blocks) + 1)
            dims.append(shape_at(sd, f"network.{pos}.0.norm1.weight"))
            transitions.append(False)
        elif f"network.{pos}.proj.weight" in sd and transitions:
            # a 2x2 stride-2 conv halves the map; a 1x1 one only changes the width
            transitions[-1] = shape_at(sd, f"network.{pos}.proj.weight", axis=3) == 2
    return {"layers": tuple(layers), "embed_dims": tuple(dims), "transitions": tuple(transitions),
            "patch_size": shape_at(sd, "patch_embed.proj.weight", axis=3)}


def hparams_of_kwargs(kw):
    return {"layers": as_tuple(kw["layers"]), "embed_dims": as_tuple(kw["embed_dims"]),
            "transitions": tuple(bool(t) for t in kw["transitions"]), "patch_size": kw["patch_size"]}


CHECKPOINT_MAPPING = register_mapping(FamilyMapping(
    "vip", "Vision Permutator",
    markers={"official": (r"^patch_embed\.proj\.weight$", r"^network\.0\.0\.attn\.mlp_h\.weight$")},
    converters={"official": dropping(*CLASSIFIER_KEY_PREFIXES)},
    hparams=hparams_of_state_dict, hparams_of_kwargs=hparams_of_kwargs, new_prefixes=("necks.",)))


# ---------------------------------------------------------------------------
# Variants (Hou et al.; Andrew-Qibin/VisionPermutator) and their ImageNet weights
# ---------------------------------------------------------------------------
def _vip(layers, embed_dims, segment_dims, transitions, patch_size) -> Dict[str, object]:
    return dict(layers=layers, embed_dims=embed_dims, segment_dims=segment_dims,
                transitions=transitions, patch_size=patch_size)


def _drive(file_id: str) -> Weights:
    """The authors' Google Drive file: timm has no ViP, so it is downloaded by hand into the cache."""
    return Weights(f"https://drive.google.com/file/d/{file_id}/view?usp=sharing", "{arch}.pth", manual=True,
                   note="the authors' README links Google Drive only and timm has no ViP: download by hand into "
                        "the cache")


MANIFEST = register_family(FamilyManifest(
    VisionPermutator, CHECKPOINT_MAPPING,
    variants=(
        Variant("vip_s14", _vip((4, 3, 8, 3), (384, 384, 384, 384), (16, 16, 16, 16), (False, False, False, False), 14),
                Weights("", "{arch}.pth", note="ViP-Small/14 appears in the paper but its weights were never "
                                               "released: trained from scratch"),
                short="vip_s14", drop_path=0.1),
        Variant("vip_s7", _vip((4, 3, 8, 3), (192, 384, 384, 384), (32, 16, 16, 16), (True, False, False, False), 7),
                _drive("1cX6eauDrsGsLSZnqsX7cl0oiKX8Dzv5z"), short="vip_s7", drop_path=0.1),
        Variant("vip_m7", _vip((4, 3, 14, 3), (256, 256, 512, 512), (32, 32, 16, 16), (False, True, False, False), 7),
                _drive("15y5WMypthpbBFdc01E3mJCZit7q0Yn8m"), short="vip_m7", drop_path=0.1),
        Variant("vip_l7", _vip((8, 8, 16, 4), (256, 512, 512, 512), (32, 16, 16, 16), (True, False, False, False), 7),
                _drive("14F5IXGXmB_3jrwK33Efae-WEb5D_G85c"), short="vip_l7", drop_path=0.1),
    )))
