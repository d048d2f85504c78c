"""LeViT: a Vision Transformer in ConvNet's Clothing (Graham et al., 2021) for dense prediction.

Architecture (as in the paper): a stem of four 3x3 stride-2 convolutions, each
followed by BatchNorm, with Hardswish between them (channels C/8, C/4, C/2, C;
stride 16), then three stages of transformer blocks on the token map. Every
projection is a bias-free Linear followed by BatchNorm. A block is a residual
multi-head attention (key dim ``D``, value dim ``2D`` per head, Hardswish
before the output projection) and a residual MLP (ratio 2). Instead of a
position embedding each attention layer learns one bias per head and per
query-key offset ``(|dy|, |dx|)``. Stages 2 and 3 start with a *shrink*
attention: queries come from the map subsampled by 2, keys and values from
the full map (``C_i / D`` heads, value dim ``4D``), followed by a residual MLP.

Pyramid: ``res2`` (stride 4, C/4 channels) is the stem activation after the
second conv, ``res3`` (stride 8, C/2) the one after the third, ``res4``
(stride 16), ``res5`` (stride 32) and ``res6`` (stride 64) are the outputs of
stages 1, 2 and 3. Stage 3 only runs when ``res6`` is requested.

Any input size: the padded stride-2 convs give ``ceil(H / 2^k)`` rows, and
the shrink attention subsamples every other token starting with the first
(``ceil(n / 2)`` queries per side, which is 14 -> 7 -> 4 at 224). The bias
tables stay those learned on the pretraining grid of side ``R`` (14, 7 and 4
for the blocks of stages 1-3; 14 and 7 for the two shrink attentions), used
in one of two ways (``attn_mode``):

* ``"window"``: the map is zero-padded to a multiple of ``R`` and cut into
  ``R x R`` tiles; attention stays inside a tile, padded keys are masked out,
  so every bias is used for exactly the offset it was learned for. A shrink
  query attends to the key tile containing its (even) position; with an even
  ``R`` every tile holds ``R / 2`` queries per side, with an odd ``R`` (7)
  tiles alternately hold 4 and 3 queries per side (at local positions
  0, 2, 4, 6 or 1, 3, 5), each still with its true offsets.
* ``"global"``: attention over the whole map; an offset beyond the table is
  clamped per axis to the largest learned one (``min(|dy|, R - 1)``).

On the pretraining grid (224 input) both modes are the classifier exactly.
The offset indices of a grid are built with tensor ops from its (possibly
symbolic) size (:func:`build_tile_geometry`), and the key mask is always
applied, so a TorchScript trace follows any input size.

BatchNorm: ``norm="FrozenBN"`` (default, detection) fixes the statistics and
affine parameters, ``"BN"`` keeps plain BatchNorm, ``"SyncBN"`` synchronizes
it across processes. :func:`pvt_d2.inference.prepare_for_inference` folds
every fixed BatchNorm into the projection before it, as the official code
does for inference (the state dict never changes).

Module names follow timm's linear ``levit_*`` models;
their checkpoints load after dropping ``head.*`` and ``head_dist.*``.
"""
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from timm.layers import DropPath
from torch import nn

from .base import LEVEL_NAMES, PyramidBackbone, checkpoint_block, drop_path_rates
from .export_ops import window_partition, window_unpartition
from .layers import attention
from .key_mapping import FamilyMapping, apply_key_fn, as_tuple, blocks_per_stage, register_mapping, shape_at
from .manifest import FamilyManifest, Option, Variant, Weights, register_family

__all__ = [
    "FrozenBatchNorm1d",
    "convert_batchnorm",
    "TileGeometry",
    "build_tile_geometry",
    "LevitAttention",
    "ShrinkAttention",
    "LevitBackbone",
]

ATTN_MODES = ("window", "global")
NORMS = ("FrozenBN", "BN", "SyncBN")


# ---------------------------------------------------------------------------
# Batch norm handling
# ---------------------------------------------------------------------------
class FrozenBatchNorm1d(FrozenBatchNorm2d):
    """Frozen BatchNorm over the channels of ``(N, C)`` rows (the tokens of :class:`LinearBN`).

    Same buffers and state-dict keys as :class:`torch.nn.BatchNorm1d`; only
    the broadcasting differs from detectron2's ``FrozenBatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype) + shift.to(x.dtype)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm1d) -> "FrozenBatchNorm1d":
        """A frozen copy of ``bn`` (its affine parameters and running statistics)."""
        frozen = cls(bn.num_features, eps=bn.eps)
        if bn.affine:
            frozen.weight.data = bn.weight.detach().clone()
            frozen.bias.data = bn.bias.detach().clone()
        frozen.running_mean.data = bn.running_mean.data
        frozen.running_var.data = bn.running_var.data
        frozen.num_batches_tracked = bn.num_batches_tracked
        return frozen

    def __repr__(self) -> str:
        return f"FrozenBatchNorm1d(num_features={self.num_features}, eps={self.eps})"


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d):
            setattr(module, name, FrozenBatchNorm1d.from_batchnorm(child))
        elif isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))
        else:
            _freeze_batchnorm(child)


def convert_batchnorm(module: nn.Module, norm: str) -> nn.Module:
    """Turn the BatchNorm1d/2d layers inside ``module`` into the requested kind, in place.

    Args:
        module: a module whose batch norms are plain ``nn.BatchNorm1d/2d``.
        norm: ``"BN"`` (unchanged), ``"SyncBN"`` (``nn.SyncBatchNorm``) or
            ``"FrozenBN"`` (:class:`FrozenBatchNorm1d` / detectron2's
            ``FrozenBatchNorm2d``). The state-dict keys stay the same.

    Returns:
        ``module``.
    """
    if norm not in NORMS:
        raise ValueError(f"LeViT norm must be one of {NORMS}, got '{norm}'")
    if norm == "FrozenBN":
        _freeze_batchnorm(module)
    elif norm == "SyncBN":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


class ConvBN(nn.Module):
    """Bias-free convolution followed by BatchNorm2d."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 3, stride: int = 2,
                 padding: int = 1):
        super().__init__()
        self.linear = nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class LinearBN(nn.Module):
    """Bias-free Linear on the last dim followed by BatchNorm over all tokens.

    Args:
        in_features: input channels.
        out_features: output channels.
        bn_weight_init: initial BatchNorm scale (0 makes a residual branch
            start as the identity).
    """

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)


# ---------------------------------------------------------------------------
# Attention geometry: which key each query sees and with which table offset
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGeometry:
    """Where the queries and keys of one attention layer sit on a given grid.

    The key map (``H x W``, channels-last) is split into ``tiles`` of ``span``
    positions (the whole map in global mode). Each tile owns ``slots`` query
    positions; ``offset_y`` / ``offset_x`` give the bias-table row / column of
    every (tile, query slot, key) triple per axis.

    Attributes:
        tiles: tile count ``(rows, cols)``.
        span: tile size ``(rows, cols)``, i.e. keys per tile and axis.
        slots: query slots per tile ``(rows, cols)``.
        offset_y: ``(T_y, slots_y, span_y)`` table rows; ``T_y`` is 1 when all
            tiles share the same layout.
        offset_x: ``(T_x, slots_x, span_x)`` table columns.
        key_mask: additive ``(tiles, 1, 1, keys)`` mask, ``-inf`` on padded keys;
            ``None`` without padding.
        slot_source: for each query slot (tile-major), the index of its query
            in the flattened query grid; ``None`` when slots are the queries in
            grid order.
        query_slot: for each query of the flattened query grid, its slot;
            ``None`` in the same case.
    """

    tiles: Tuple[int, int]
    span: Tuple[int, int]
    slots: Tuple[int, int]
    offset_y: torch.Tensor
    offset_x: torch.Tensor
    key_mask: Optional[torch.Tensor]
    slot_source: Optional[torch.Tensor]
    query_slot: Optional[torch.Tensor]

    @property
    def num_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]


def _ceil_div(a, b: int):
    """``ceil(a / b)`` for a Python int, a ``SymInt`` (export) or a traced size (a 0-d tensor)."""
    return (a + b - 1) // b


def _axis_layout(length, table: int, stride: int, windowed: bool, device: torch.device):
    """Geometry along one axis of ``length`` keys; see :class:`TileGeometry`.

    Queries sit at key positions ``0, stride, 2 * stride, ...``. Everything is
    computed with tensor ops from ``length`` (an int, a ``SymInt`` under
    :func:`torch.export.export` or a traced size under :func:`torch.jit.trace`),
    so a recorded graph rebuilds the geometry of every input size. Returns
    ``(num_tiles, span, slots, query_tile, query_slot, offsets, key_valid, slot_query)``:
    ``key_valid`` ``(tiles, span)`` is True on real keys (None in global mode),
    ``slot_query`` ``(tiles, slots)`` the query index of each slot (0 on empty slots).
    """
    num_queries = _ceil_div(length, stride)
    query_pos = torch.arange(num_queries, device=device) * stride
    if not windowed:
        keys = torch.arange(length, device=device)
        offsets = (query_pos[:, None] - keys[None, :]).abs().clamp(max=table - 1)
        slot = torch.arange(num_queries, device=device)
        return 1, length, num_queries, torch.zeros_like(slot), slot, offsets[None], None, slot[None]
    num_tiles = _ceil_div(length, table)
    slots = -(-table // stride)
    tile_start = torch.arange(num_tiles, device=device)[:, None] * table
    # A tile's first query sits at the first multiple of the stride inside it.
    local = (-tile_start) % stride + torch.arange(slots, device=device)[None, :] * stride
    in_tile = local < table
    slot_query = torch.where(in_tile & (tile_start + local < length),
                             torch.div(tile_start + local, stride, rounding_mode="floor"), 0)
    keys = torch.arange(table, device=device)
    offsets = (torch.where(in_tile, local, 0)[:, :, None] - keys[None, None, :]).abs()
    if table % stride == 0:  # every tile has the same query layout
        offsets = offsets[:1]
    key_valid = tile_start + keys[None, :] < length
    query_tile = torch.div(query_pos, table, rounding_mode="floor")
    query_slot = torch.div(query_pos - query_tile * table, stride, rounding_mode="floor")
    return num_tiles, table, slots, query_tile, query_slot, offsets, key_valid, slot_query


def build_tile_geometry(grid, table: int, stride: int, windowed: bool, device: torch.device,
                        always_mask: bool = False) -> TileGeometry:
    """The :class:`TileGeometry` of a layer on a ``grid`` of keys.

    Args:
        grid: key map size ``(H, W)``: ints, or the symbolic / traced sizes
            seen while exporting or tracing.
        table: side ``R`` of the learned bias table (the pretraining grid).
        stride: 1 for self-attention, 2 for shrink attention.
        windowed: ``R x R`` tiles (window mode) or the whole map (global mode).
        device: where the index tensors live.
        always_mask: build the key mask even when no key is padding (an
            all-zero mask), so that a recorded graph does not depend on
            whether the example input needed padding.
    """
    ty, sy, qy, tile_y, slot_y, off_y, valid_y, src_y = _axis_layout(grid[0], table, stride, windowed, device)
    tx, sx, qx, tile_x, slot_x, off_x, valid_x, src_x = _axis_layout(grid[1], table, stride, windowed, device)
    key_mask = None
    if windowed and (always_mask or not bool(valid_y.all() & valid_x.all())):
        valid = (valid_y[:, None, :, None] & valid_x[None, :, None, :]).reshape(ty * tx, 1, 1, sy * sx)
        key_mask = torch.zeros(valid.shape, device=device).masked_fill(~valid, float("-inf"))
    slot_source = query_slot = None
    if windowed and stride > 1:
        tile = tile_y[:, None] * tx + tile_x[None, :]
        query_slot = ((tile * qy + slot_y[:, None]) * qx + slot_x[None, :]).flatten()
        queries_per_row = _ceil_div(grid[1], stride)
        slot_source = (src_y[:, None, :, None] * queries_per_row + src_x[None, :, None, :]).flatten()
    return TileGeometry((ty, tx), (sy, sx), (qy, qx), off_y, off_x, key_mask, slot_source, query_slot)


# ---------------------------------------------------------------------------
# Attention layers
# ---------------------------------------------------------------------------
class _OffsetBiasAttention(nn.Module):
    """Shared part of the two attentions: the bias table, tiling and the attention itself.

    Args:
        num_heads: attention heads.
        key_dim: query/key channels per head.
        table_size: side ``R`` of the key grid the biases were learned on.
        stride: query subsampling (1 or 2).
        attn_mode: ``"window"`` or ``"global"`` (see the module docstring).
    """

    def __init__(self, num_heads: int, key_dim: int, table_size: int, stride: int, attn_mode: str):
        super().__init__()
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"LeViT attn_mode must be one of {ATTN_MODES}, got '{attn_mode}'")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim ** -0.5
        self.table_size = table_size
        self.stride = stride
        self.attn_mode = attn_mode
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, table_size * table_size))

    def geometry(self, grid: Tuple[int, int], device: torch.device) -> TileGeometry:
        """The geometry of this layer on a key ``grid`` (with a key mask even where nothing is padded)."""
        windowed = self.attn_mode == "window"
        return build_tile_geometry(grid, self.table_size, self.stride, windowed, device, always_mask=True)

    def gather_bias(self, geo: TileGeometry) -> torch.Tensor:
        """The learned biases of every (tile layout, head, query slot, key): ``(1 or tiles, heads, Q, K)``."""
        table = self.attention_biases.view(self.num_heads, self.table_size, self.table_size)
        oy, ox = geo.offset_y, geo.offset_x
        bias = table[:, oy[:, None, :, None, :, None], ox[None, :, None, :, None, :]]
        h, t_y, t_x, q_y, q_x, k_y, k_x = bias.shape
        return bias.reshape(h, t_y * t_x, q_y * q_x, k_y * k_x).transpose(0, 1)

    def attention_mask(self, geo: TileGeometry) -> torch.Tensor:
        """Additive mask ``(tiles or 1, heads, queries, keys)``: biases plus key padding."""
        bias = self.gather_bias(geo)
        return bias if geo.key_mask is None else bias + geo.key_mask

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` map to ``(B, tiles, keys per tile, C)``, padded in window mode."""
        if self.attn_mode == "window":
            return window_partition(x, self.table_size)
        b, h, w, c = x.shape
        return x.reshape(b, 1, h * w, c)

    def from_tiles(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`to_tiles`, cropping the padding."""
        if self.attn_mode == "window":
            return window_unpartition(x, self.table_size, hw)
        return x.reshape(x.shape[0], hw[0], hw[1], x.shape[-1])

    def split_heads(self, x: torch.Tensor, sizes: Sequence[int]) -> List[torch.Tensor]:
        """``(B, T, N, heads * sum(sizes))`` to per-head ``(B, T, heads, N, size)`` pieces."""
        b, t, n, _ = x.shape
        parts = x.view(b, t, n, self.num_heads, -1).split(list(sizes), dim=-1)
        return [p.permute(0, 1, 3, 2, 4) for p in parts]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention per tile with the additive ``mask`` (:meth:`attention_mask`); ``(B, T, queries, heads * d_v)``."""
        out = attention(q, k, v, self.scale, mask.to(q.dtype))
        b, t, _, n, _ = out.shape
        return out.permute(0, 1, 3, 2, 4).reshape(b, t, n, -1)


class LevitAttention(_OffsetBiasAttention):
    """LeViT self-attention with learned offset biases on a ``(B, H, W, C)`` map.

    Args:
        dim: token channels.
        key_dim: query/key channels per head.
        num_heads: attention heads.
        attn_ratio: value channels per head as a multiple of ``key_dim``.
        table_size: side of the pretraining token grid.
        attn_mode: ``"window"`` or ``"global"``.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, table_size: int,
                 attn_mode: str = "window"):
        super().__init__(num_heads, key_dim, table_size, 1, attn_mode)
        self.val_dim = int(attn_ratio * key_dim)
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(OrderedDict([
            ("act", nn.Hardswish()),
            ("ln", LinearBN(num_heads * self.val_dim, dim, bn_weight_init=0.0)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = (x.shape[1], x.shape[2])
        geo = self.geometry(hw, x.device)
        q, k, v = self.split_heads(self.to_tiles(self.qkv(x)), (self.key_dim, self.key_dim, self.val_dim))
        out = self.from_tiles(self.attend(q, k, v, self.attention_mask(geo)), hw)
        return self.proj(out)


class StridedQuery(nn.Module):
    """Query projection of the shrink attention: subsample the map by ``stride``, then Linear+BN.

    Keeps rows/columns ``0, stride, 2 * stride, ...``: ``ceil(n / stride)`` per side.
    """

    def __init__(self, dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.ln = LinearBN(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x[:, ::self.stride, ::self.stride])


class ShrinkAttention(_OffsetBiasAttention):
    """LeViT's subsampling attention: ``ceil(H/2) x ceil(W/2)`` queries attend to the ``H x W`` map.

    Args:
        in_dim: input channels.
        out_dim: output channels.
        key_dim: query/key channels per head.
        num_heads: attention heads.
        attn_ratio: value channels per head as a multiple of ``key_dim``.
        table_size: side of the pretraining key grid.
        attn_mode: ``"window"`` or ``"global"``.
        stride: query subsampling.
    """

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 table_size: int, attn_mode: str = "window", stride: int = 2):
        super().__init__(num_heads, key_dim, table_size, stride, attn_mode)
        self.val_dim = int(attn_ratio * key_dim)
        self.kv = LinearBN(in_dim, num_heads * (key_dim + self.val_dim))
        self.q = StridedQuery(in_dim, num_heads * key_dim, stride)
        self.proj = nn.Sequential(OrderedDict([
            ("act", nn.Hardswish()),
            ("ln", LinearBN(num_heads * self.val_dim, out_dim)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        geo = self.geometry((x.shape[1], x.shape[2]), x.device)
        k, v = self.split_heads(self.to_tiles(self.kv(x)), (self.key_dim, self.val_dim))
        q = self.q(x)
        b, hq, wq, c = q.shape
        q = q.reshape(b, hq * wq, c)
        if geo.slot_source is not None:
            q = q[:, geo.slot_source]
        (q,) = self.split_heads(q.reshape(b, geo.num_tiles, -1, c), (self.key_dim,))
        out = self.attend(q, k, v, self.attention_mask(geo)).reshape(b, -1, self.num_heads * self.val_dim)
        if geo.query_slot is not None:
            out = out[:, geo.query_slot]
        return self.proj(out.reshape(b, hq, wq, -1))


# ---------------------------------------------------------------------------
# Blocks, stages, stem
# ---------------------------------------------------------------------------
class LevitMlp(nn.Module):
    """Linear+BN, Hardswish, Linear+BN (last BN scale starts at 0)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.ln1 = LinearBN(dim, hidden_dim)
        self.act = nn.Hardswish()
        self.ln2 = LinearBN(hidden_dim, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitBlock(nn.Module):
    """Residual attention then residual MLP on a ``(B, H, W, C)`` map."""

    act_checkpoint = False  # see PyramidBackbone.set_act_checkpoint

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float,
                 table_size: int, attn_mode: str, drop_path: float = 0.0):
        super().__init__()
        self.attn = LevitAttention(dim, key_dim, num_heads, attn_ratio, table_size, attn_mode)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class ShrinkBlock(nn.Module):
    """Shrink attention (no residual: the shape changes) then a residual MLP."""

    act_checkpoint = False  # see PyramidBackbone.set_act_checkpoint

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 mlp_ratio: float, table_size: int, attn_mode: str, drop_path: float = 0.0):
        super().__init__()
        self.attn_downsample = ShrinkAttention(in_dim, out_dim, key_dim, num_heads, attn_ratio,
                                               table_size, attn_mode)
        self.mlp = LevitMlp(out_dim, int(out_dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return x + self.drop_path(self.mlp(x))


class LevitStage(nn.Module):
    """Optional shrink block followed by ``depth`` LeViT blocks."""

    def __init__(self, downsample: Optional[nn.Module], blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = checkpoint_block(self.downsample, x)
        for blk in self.blocks:
            x = checkpoint_block(blk, x)
        return x


class LevitStem(nn.Sequential):
    """Four 3x3 stride-2 Conv+BN layers (C/8, C/4, C/2, C) with Hardswish between them."""

    def __init__(self, in_chans: int, dim: int):
        chans = [in_chans, dim // 8, dim // 4, dim // 2, dim]
        layers = OrderedDict()
        for i in range(4):
            layers[f"conv{i + 1}"] = ConvBN(chans[i], chans[i + 1])
            if i < 3:
                layers[f"act{i + 1}"] = nn.Hardswish()
        super().__init__(layers)

    def forward_res2(self, x: torch.Tensor) -> torch.Tensor:
        """The stride-4 map (``res2``): the first two Conv+BN layers and their activations."""
        return self.act2(self.conv2(self.act1(self.conv1(x))))

    def forward_res3(self, res2: torch.Tensor) -> torch.Tensor:
        """The stride-8 map (``res3``) from ``res2``."""
        return self.act3(self.conv3(res2))


# ---------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------
class LevitBackbone(PyramidBackbone):
    """LeViT as a detectron2 backbone (``res2``-``res5``, optionally ``res6``).

    Args:
        embed_dims: channels of the three transformer stages.
        key_dim: query/key channels per head ``D``.
        num_heads: heads of the blocks of each stage.
        depths: blocks per stage.
        attn_ratio: value/key channel ratio in the blocks.
        mlp_ratio: MLP hidden ratio in the blocks.
        down_attn_ratio: value/key channel ratio of the shrink attentions.
        down_mlp_ratio: MLP hidden ratio after the shrink attentions.
        pretrain_img_size: image side the bias tables were learned for (224
            gives token grids 14, 7, 4).
        in_chans: image channels.
        out_features: returned levels among ``res2``-``res6``.
        drop_path_rate: stochastic depth of the last residual branch, linearly
            increasing from 0 over all blocks (shrink blocks included).
        output_norm: add a LayerNorm on each returned level.
        freeze_at: see :class:`PyramidBackbone`; ``res2`` and ``res3`` come from
            the stem, so 1-3 freeze the stem, 4-6 also stages 1-3.
        attn_mode: ``"window"`` or ``"global"`` (module docstring).
        norm: ``"FrozenBN"``, ``"BN"`` or ``"SyncBN"``.
    """

    no_weight_decay_keywords = ("attention_biases",)  # attention bias tables: no weight decay

    def __init__(self, embed_dims: Sequence[int] = (128, 256, 384), key_dim: int = 16,
                 num_heads: Sequence[int] = (4, 6, 8), depths: Sequence[int] = (2, 3, 4),
                 attn_ratio: float = 2.0, mlp_ratio: float = 2.0, down_attn_ratio: float = 4.0,
                 down_mlp_ratio: float = 2.0, pretrain_img_size: int = 224, in_chans: int = 3,
                 out_features: Optional[Sequence[str]] = None, drop_path_rate: float = 0.0,
                 output_norm: bool = False, freeze_at: int = 0, attn_mode: str = "window",
                 norm: str = "FrozenBN"):
        super().__init__()
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"LeViT attn_mode must be one of {ATTN_MODES}, got '{attn_mode}'")
        if norm not in NORMS:
            raise ValueError(f"LeViT norm must be one of {NORMS}, got '{norm}'")
        self.attn_mode = attn_mode
        self.stem = LevitStem(in_chans, embed_dims[0])

        # one rate per residual branch: every block, and the shrink block starting every stage but the first
        num_branches = sum(depths) + len(depths) - 1
        rates = iter(drop_path_rates(drop_path_rate, [num_branches])[0])
        grid = math.ceil(pretrain_img_size / 16)
        stages = []
        for i, (dim, depth, heads) in enumerate(zip(embed_dims, depths, num_heads)):
            downsample = None
            if i > 0:
                downsample = ShrinkBlock(embed_dims[i - 1], dim, key_dim, embed_dims[i - 1] // key_dim,
                                         down_attn_ratio, down_mlp_ratio, grid, attn_mode, next(rates))
                grid = math.ceil(grid / 2)
            blocks = [LevitBlock(dim, key_dim, heads, attn_ratio, mlp_ratio, grid, attn_mode, next(rates))
                      for _ in range(depth)]
            stages.append(LevitStage(downsample, blocks))
        self.stages = nn.ModuleList(stages)
        convert_batchnorm(self, norm)

        c = embed_dims[0]
        channels = {"res2": c // 4, "res3": c // 2, "res4": c, "res5": embed_dims[1], "res6": embed_dims[2]}
        strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32, "res6": 64}
        self._init_pyramid(channels, strides, out_features, output_norm, freeze_at)

    @classmethod
    def family_kwargs_from_cfg(cls, cfg) -> Dict[str, str]:
        """``attn_mode`` and ``norm`` from ``MODEL.PVT_D2.LEVIT``."""
        return {"attn_mode": cfg.MODEL.PVT_D2.LEVIT.ATTN_MODE, "norm": cfg.MODEL.PVT_D2.LEVIT.NORM}

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        return [self.stem] + list(self.stages[:max(min(freeze_at - 3, len(self.stages)), 0)])

    def forward_res4(self, res3: torch.Tensor) -> torch.Tensor:
        """The first transformer stage on the stem's last conv; channels-last ``(B, H, W, C)`` out."""
        return self.stages[0](self.stem.conv4(res3).permute(0, 2, 3, 1))

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        # res2 and res3 are taps inside the stem (the classifier's stem has no stage boundary there)
        stages = [self.stem.forward_res2, self.stem.forward_res3, self.forward_res4, *self.stages[1:]]
        levels = self.run_stages(x, stages, needed)
        # the transformer stages run on (B, H, W, C); their levels are channels-last (B, C, H, W) views, no copy
        return {name: y.permute(0, 3, 1, 2) if LEVEL_NAMES.index(name) >= 2 else y for name, y in levels.items()}


# ---------------------------------------------------------------------------
# Checkpoints: facebookresearch/LeViT levit.py, and timm's levit (= ours)
# ---------------------------------------------------------------------------
def _linear_2d(k: str, v: torch.Tensor) -> torch.Tensor:
    """timm ``levit_conv_*`` / official ``levit_c`` store the token projections as 1x1 convs; ours are Linear."""
    if k.endswith(".linear.weight") and not k.startswith("stem.") and v.dim() == 4 and v.shape[-2:] == (1, 1):
        return v[:, :, 0, 0]
    return v


def convert_timm(state_dict):
    """timm ``levit_*`` (and ``levit_conv_*``) to ours; drops head, head_dist and the bias index buffers."""

    def key_fn(k, v):
        if k.startswith(("head.", "head_dist.")) or k.endswith("attention_bias_idxs"):
            return None
        return k, _linear_2d(k, v)

    return apply_key_fn(state_dict, key_fn)


_OFFICIAL_ATTN = (("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.ln.linear."),
               ("m.proj.1.bn.", "proj.ln.bn."), ("m.attention_biases", "attention_biases"))
_OFFICIAL_SHRINK = (("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.ln.linear."), ("q.1.bn.", "q.ln.bn."),
                 ("proj.1.c.", "proj.ln.linear."), ("proj.1.bn.", "proj.ln.bn."),
                 ("attention_biases", "attention_biases"))
_OFFICIAL_MLP = (("m.0.c.", "ln1.linear."), ("m.0.bn.", "ln1.bn."), ("m.2.c.", "ln2.linear."), ("m.2.bn.", "ln2.bn."))


def _official_block_roles(state_dict) -> Dict[int, Tuple[str, Tuple[Tuple[str, str], ...]]]:
    """For every index of the official flat ``blocks`` sequence: its pvt_d2 prefix and renaming table.

    The sequence is, per stage, ``depth`` x (attention residual, MLP residual),
    with a shrink attention and its MLP residual between stages; the role of
    each entry is read from its keys.
    """
    indices = sorted({int(m.group(1)) for k in state_dict for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    roles = {}
    stage, block, owner = 0, -1, None
    for i in indices:
        p = f"blocks.{i}."
        if f"{p}m.qkv.c.weight" in state_dict:
            block += 1
            owner = f"stages.{stage}.blocks.{block}."
            roles[i] = (owner + "attn.", _OFFICIAL_ATTN)
        elif f"{p}kv.c.weight" in state_dict:
            stage, block = stage + 1, -1
            owner = f"stages.{stage}.downsample."
            roles[i] = (owner + "attn_downsample.", _OFFICIAL_SHRINK)
        elif f"{p}m.0.c.weight" in state_dict and owner is not None:
            roles[i] = (owner + "mlp.", _OFFICIAL_MLP)
    return roles


def convert_official(state_dict):
    """facebookresearch/LeViT names to timm's (= ours); drops head, head_dist and attention_bias_idxs."""
    roles = _official_block_roles(state_dict)

    def key_fn(k, v):
        if k.startswith(("head.", "head_dist.")) or k.endswith("attention_bias_idxs"):
            return None
        m = re.fullmatch(r"patch_embed\.(\d)\.(c|bn)\.(.+)", k)
        if m and int(m.group(1)) in (0, 2, 4, 6):
            sub = "linear" if m.group(2) == "c" else "bn"
            k = f"stem.conv{int(m.group(1)) // 2 + 1}.{sub}.{m.group(3)}"
            return k, v
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", k)
        if m and int(m.group(1)) in roles:
            prefix, table = roles[int(m.group(1))]
            for old, new in table:
                if m.group(2).startswith(old):
                    k = prefix + new + m.group(2)[len(old):]
                    return k, _linear_2d(k, v)
        return k, v

    return apply_key_fn(state_dict, key_fn)


def hparams_of_state_dict(sd):
    """The variant numbers read from a pvt_d2 state dict."""
    depths = blocks_per_stage(sd, r"stages\.(\d+)\.blocks\.(\d+)\.attn\.attention_biases")
    dims = tuple(shape_at(sd, f"stages.{i}.blocks.0.mlp.ln2.linear.weight") for i in range(len(depths)))
    heads = tuple(shape_at(sd, f"stages.{i}.blocks.0.attn.attention_biases") for i in range(len(depths)))
    return {"depths": depths, "embed_dims": dims, "num_heads": heads}


def hparams_of_kwargs(kw):
    return {"depths": as_tuple(kw["depths"]), "embed_dims": as_tuple(kw["embed_dims"]),
            "num_heads": as_tuple(kw["num_heads"])}


CHECKPOINT_MAPPING = register_mapping(FamilyMapping(
    "levit", "LeViT",
    markers={"official": (r"^patch_embed\.0\.c\.weight$", r"^blocks\.0\.m\.qkv\.c\.weight$"),
             "timm": (r"^stem\.conv1\.linear\.weight$", r"^stages\.0\.blocks\.0\.attn\.attention_biases$")},
    converters={"official": convert_official, "timm": convert_timm},
    hparams=hparams_of_state_dict, hparams_of_kwargs=hparams_of_kwargs))


# ---------------------------------------------------------------------------
# Variants: architecture, ImageNet weights (facebookresearch/LeViT levit.py)
# ---------------------------------------------------------------------------
def _weights(file: str) -> Weights:
    return Weights(f"https://dl.fbaipublicfiles.com/LeViT/{file}.pth", f"{file}.pth")


MANIFEST = register_family(FamilyManifest(
    LevitBackbone, CHECKPOINT_MAPPING,
    variants=(
        Variant("levit_128s", dict(embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depths=(2, 3, 4)),
                _weights("LeViT-128S-96703c44"), short="levit_128s", drop_path=0.0),
        Variant("levit_128", dict(embed_dims=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depths=(4, 4, 4)),
                _weights("LeViT-128-b88c2750"), short="levit_128", drop_path=0.0),
        Variant("levit_192", dict(embed_dims=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depths=(4, 4, 4)),
                _weights("LeViT-192-92712e41"), short="levit_192", drop_path=0.0),
        Variant("levit_256", dict(embed_dims=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depths=(4, 4, 4)),
                _weights("LeViT-256-13b5763e"), short="levit_256", drop_path=0.0),
        Variant("levit_384", dict(embed_dims=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depths=(4, 4, 4),
                                  drop_path_rate=0.1),
                _weights("LeViT-384-9bdaf2e2"), short="levit_384", drop_path=0.1),
    ),
    levels=LEVEL_NAMES,
    options=(Option("ATTN_MODE", choices=ATTN_MODES), Option("NORM", choices=NORMS))))
