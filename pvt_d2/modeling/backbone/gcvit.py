"""GC ViT: Global Context Vision Transformers (Hatamizadeh et al., 2022).

Architecture
    * Stem: a 3x3 stride-2 conv, then a :class:`ReduceSize` block (LayerNorm,
      Fused-MBConv, 3x3 stride-2 conv, LayerNorm): stride 4.
    * Four stages. Stages 2-4 open with a :class:`ReduceSize` that halves the
      resolution and doubles the channels, so the stage outputs are ``res2``
      .. ``res5`` at strides 4, 8, 16, 32 with ``dim * 2**i`` channels. The
      last stage ends with a LayerNorm; its output (after that norm) is
      ``res5``, exactly as timm's ``features_only`` model returns it.
    * Inside a stage, blocks alternate local window attention (even blocks)
      and global query attention (odd blocks). Both attend within
      non-overlapping windows with a relative position bias; in global blocks
      the queries are not projected from the window but taken from a global
      query map that the stage's :class:`GlobalQueryGenerator` (Fused-MBConv
      blocks with 3x3 stride-2 max-pools) computes once from the whole map;
      every window of an image shares it.
    * small / base add layer scale to both residual branches.

Any input size (the rule)
    * Windows: ``window_sizes`` sets the window side of each stage. ``None``
      (``MODEL.PVT_D2.GCVIT.WINDOW_SIZES: []``) keeps the ImageNet windows
      7, 7, 14, 7; the detection configs use 24 in every stage, like the
      official detection code. Each block zero-pads its (normalised) map at
      the bottom/right to a multiple of the window and crops the result back,
      so stage ``i`` keeps ``ceil(H / s_i)`` x ``ceil(W / s_i)`` positions.
      Padded positions take part as keys and values, as in the official
      detection code (``mask_padding=False``, the default); with
      ``mask_padding=True`` they are masked out of every softmax instead (a
      window always holds at least one real position, so this is well
      defined). At 224 with the ImageNet windows nothing is padded.
    * Relative position bias: every table keeps the shape of its ImageNet
      window, ``((2 * w_in - 1) ** 2, heads)``, so a timm 224 checkpoint loads
      with ``strict=True`` whatever the window policy. When a stage runs with
      another window ``w``, the table is resized bicubically to
      ``(2 * w - 1) ** 2`` on the fly (the official detection code resizes
      once at build time instead). Because the parameters never change shape,
      detectron2's checkpointer (which drops mismatched shapes before
      ``load_state_dict``) loads ImageNet and fine-tuned weights alike.
    * Global queries: the number of max-pool steps of a generator is fixed
      from the nominal 224 input, never from the actual image: a stage whose
      window equals its nominal 224 grid (56, 28, 14, 7) does not pool;
      every other stage pools down to the nominal stride-32 grid, i.e.
      ``log2(32 / stride)`` steps. This gives timm's 3, 2, 0, 0 for the
      ImageNet windows and the official detection code's 3, 2, 1, 0 for
      window 24. The pooled map is then resized bicubically to the stage's
      window (a no-op at 224 with the ImageNet windows). The generator always
      has the convolutions of the ImageNet model, so its weights always load.
    * Export: the window padding and the resize of the global queries always
      run while the model is recorded (:mod:`.export_ops`; exact no-ops when
      not needed), so a TorchScript trace follows any input size.

Module and parameter names mirror timm's ``gcvit_*`` models: a timm state
dict loads with ``load_state_dict(strict=True)`` after dropping ``head.*``.

First-generation official weights
    The first released NVlabs/GCVit code (``models/gc_vit.py`` of June 2022,
    commits 4fc1706 and a6bac2d; keys ``levels.{i}.to_q_global.*``) differs
    from the later code and timm in two places, and its weights were trained
    with them: (a) the level's channels-last map is ``.view``-ed, not
    permuted, as channels-first before the query generator, and (b) the
    generator's channels-first output is reshaped into heads directly instead
    of as tokens. :func:`first_generation_global_queries` reproduces both for
    any input size. :attr:`GCViT.first_generation_queries` switches it on; it
    travels with the weights as the state-dict entry
    :data:`FIRST_GENERATION_QUERIES_KEY` (set by the checkpoint converter for
    that layout, restored by ``load_state_dict``). Not reproduced: at batch
    size > 1 that code's ``repeat`` gives the windows of one image the queries
    of other images of the batch; here every image uses its own, i.e. the
    first-generation model's output at batch size 1.
"""
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, SEModule, trunc_normal_
from torch import nn

from .base import LEVEL_NAMES, LEVEL_STRIDES, PyramidBackbone, checkpoint_block, drop_path_rates
from .export_ops import resize_to, to_contiguous, window_partition, window_unpartition
from .layers import LayerNorm2d, Mlp, attention
from .key_mapping import (
    FamilyMapping,
    apply_key_fn,
    as_tuple,
    blocks_per_stage,
    dropping,
    hidden_ratio,
    register_mapping,
    shape_at,
)
from .manifest import FamilyManifest, Option, Variant, Weights, register_family

__all__ = [
    "FIRST_GENERATION_QUERIES_KEY",
    "GCViT",
    "GlobalContextAttention",
    "GlobalQueryGenerator",
    "RelativePositionBias",
    "first_generation_global_queries",
    "global_query_pool_steps",
    "IMAGENET_WINDOW_SIZES",
]

STAGE_STRIDES = tuple(LEVEL_STRIDES[name] for name in LEVEL_NAMES[:4])
IMAGENET_WINDOW_SIZES = (7, 7, 14, 7)
NOMINAL_IMAGE_SIZE = 224
#: State-dict entry (relative to the backbone) marking weights of the first-generation official code.
FIRST_GENERATION_QUERIES_KEY = "first_generation_queries"


def global_query_pool_steps(window_sizes: Sequence[int], image_size: int = NOMINAL_IMAGE_SIZE) -> Tuple[int, ...]:
    """Max-pool steps of each stage's global query generator (see the module docstring).

    Args:
        window_sizes: window side of each stage.
        image_size: the nominal (pretraining) image side.

    Returns:
        One step count per stage; independent of the actual input size.
    """
    steps = []
    for stride, window in zip(STAGE_STRIDES, window_sizes):
        nominal_grid = image_size // stride
        steps.append(0 if window == nominal_grid else int(round(math.log2(STAGE_STRIDES[-1] // stride))))
    return tuple(steps)


class MbConvBlock(nn.Module):
    """GC ViT's Fused-MBConv: 3x3 depthwise conv, GELU, squeeze-excite, 1x1 conv, plus the input.

    No normalisation and no bias, as in the paper. Works on ``(B, C, H, W)``.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.act = nn.GELU()
        self.se = SEModule(dim, rd_ratio=0.25, bias=False, act_layer=nn.GELU)
        self.conv_pw = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_pw(self.se(self.act(self.conv_dw(x))))


class ReduceSize(nn.Module):
    """Downsampler: LayerNorm, Fused-MBConv, 3x3 stride-2 conv, LayerNorm (``(B, C, H, W)`` in and out).

    The padded stride-2 conv maps a side ``n`` to ``ceil(n / 2)``.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None):
        super().__init__()
        dim_out = dim_out or dim
        self.norm1 = LayerNorm2d(dim)
        self.conv_block = MbConvBlock(dim)
        self.reduction = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1, bias=False)
        self.norm2 = LayerNorm2d(dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.reduction(self.conv_block(self.norm1(x))))


class Stem(nn.Module):
    """3x3 stride-2 conv to ``dim`` channels, then a same-width :class:`ReduceSize`: stride 4."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, 3, stride=2, padding=1)
        self.down = ReduceSize(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.conv1(x))


class GlobalQueryGenerator(nn.Module):
    """Computes a stage's global query tokens from its whole feature map.

    ``num_convs`` Fused-MBConv blocks (``conv1``, ``conv2``, ...), the first
    ``pool_steps`` of them followed by a 3x3 stride-2 max-pool (``pool1``,
    ...). The pooled map is resized bicubically to ``window_size`` x
    ``window_size`` when its size differs, and flattened row-major to one
    query per window position.

    Args:
        dim: channels.
        num_convs: Fused-MBConv blocks (those of the ImageNet model).
        pool_steps: max-pool steps, ``<= num_convs``
            (see :func:`global_query_pool_steps`).
        window_size: side of the attention window the queries are for.
    """

    def __init__(self, dim: int, num_convs: int, pool_steps: int, window_size: int):
        super().__init__()
        if pool_steps > num_convs:
            raise ValueError(f"pool_steps ({pool_steps}) cannot exceed num_convs ({num_convs})")
        self.window_size = window_size
        self.pool_steps = pool_steps
        self.blocks = nn.Sequential()
        for i in range(num_convs):
            self.blocks.add_module(f"conv{i + 1}", MbConvBlock(dim))
            if i < pool_steps:
                self.blocks.add_module(f"pool{i + 1}", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` map to ``(B, window_size**2, C)`` query tokens."""
        q = resize_to(self.blocks(x), (self.window_size, self.window_size), mode="bicubic")
        return q.flatten(2).transpose(1, 2)


def first_generation_global_queries(generator: GlobalQueryGenerator, x: torch.Tensor,
                                    num_heads: int) -> torch.Tensor:
    """Global queries as the first-generation official code computed them (see the module docstring).

    Args:
        generator: the stage's query generator.
        x: the stage's map ``(B, C, H, W)``.
        num_heads: attention heads of the stage.

    Returns:
        ``(B, N, C)`` tokens that :class:`GlobalContextAttention` splits into
        the heads that code used.
    """
    b, c, h, w = x.shape
    q = generator(x.permute(0, 2, 3, 1).reshape(b, c, h, w))  # (a) channels-last memory read as channels-first
    n = q.shape[1]
    # (b) the (C, N) channels-first memory cut into (heads, N, C / heads), re-expressed as tokens
    q = q.transpose(1, 2).reshape(b, num_heads, n, c // num_heads)
    return q.transpose(1, 2).reshape(b, n, c)


def relative_position_index(window_size: int) -> torch.Tensor:
    """``(N, N)`` index into a ``(2w-1) x (2w-1)`` table (row-major) for every query/key pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)
    delta = (coords[:, :, None] - coords[:, None, :]) + (window_size - 1)
    return delta[0] * (2 * window_size - 1) + delta[1]


class RelativePositionBias(nn.Module):
    """Learned relative position bias of a square window, with its table kept at the pretraining window.

    ``relative_position_bias_table`` has the shape of ``pretrain_window_size``
    so that ImageNet checkpoints load unchanged; at another ``window_size``
    the table is resized bicubically (as a ``(2w-1) x (2w-1)`` image per head)
    before the lookup.

    Args:
        window_size: window side used at run time.
        pretrain_window_size: window side the table was learned for.
        num_heads: attention heads.
    """

    def __init__(self, window_size: int, pretrain_window_size: int, num_heads: int):
        super().__init__()
        self.window_size = window_size
        self.pretrain_window_size = pretrain_window_size
        self.num_heads = num_heads
        side = 2 * pretrain_window_size - 1
        self.relative_position_bias_table = nn.Parameter(torch.zeros(side * side, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size).flatten(),
                             persistent=False)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _resize(self, table: torch.Tensor) -> torch.Tensor:
        src, dst = 2 * self.pretrain_window_size - 1, 2 * self.window_size - 1
        grid = table.t().reshape(1, self.num_heads, src, src)
        grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
        return grid.reshape(self.num_heads, dst * dst).t()

    def resized_table(self) -> torch.Tensor:
        """The table for ``window_size``, ``((2w-1)**2, heads)``; the parameter itself when no resize is needed."""
        table = self.relative_position_bias_table
        return table if self.window_size == self.pretrain_window_size else self._resize(table)

    def forward(self) -> torch.Tensor:
        """The ``(heads, N, N)`` additive attention bias, ``N = window_size**2``."""
        n = self.window_size * self.window_size
        table = self.resized_table().t().contiguous()
        return table[:, self.relative_position_index].view(self.num_heads, n, n)


class GlobalContextAttention(nn.Module):
    """Multi-head attention inside windows with relative position bias, local or global-query.

    Local (``use_global=False``): queries, keys and values are projected from
    the window (``qkv`` has ``3 * dim`` outputs). Global: only keys and values
    are (``2 * dim`` outputs); the queries are the image's global query tokens,
    shared by all of its windows and split into heads like the keys.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side at run time.
        pretrain_window_size: window side of the relative position table.
        use_global: global-query attention.
        qkv_bias: bias on the ``qkv`` projection.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, pretrain_window_size: int,
                 use_global: bool, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.use_global = use_global
        self.rel_pos = RelativePositionBias(window_size, pretrain_window_size, num_heads)
        self.qkv = nn.Linear(dim, dim * (2 if use_global else 3), bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, q_global: Optional[torch.Tensor] = None,
                key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args:
            x: windows grouped by image, ``(B, num_windows, N, C)``.
            q_global: ``(B, N, C)`` global queries (global attention only).
            key_padding: optional ``(num_windows, N)`` bool, True at padded
                positions, which are then excluded as keys.

        Returns:
            ``(B, num_windows, N, C)``.
        """
        return self.proj_drop(self.proj(self.attend_windows(x, q_global, key_padding)))

    def split_qkv(self, x: torch.Tensor, q_global: Optional[torch.Tensor]):
        """Per-head ``(B, nW, heads, N, head_dim)`` keys and values, and the queries (one window when global)."""
        b, nw, n, c = x.shape
        heads, hd = self.num_heads, self.head_dim
        if not self.use_global:
            return self.qkv(x).view(b, nw, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5).unbind(0)
        if q_global is None:
            raise ValueError("global-query attention needs q_global")
        k, v = self.qkv(x).view(b, nw, n, 2, heads, hd).permute(3, 0, 1, 4, 2, 5).unbind(0)
        return q_global.reshape(b, 1, n, heads, hd).transpose(2, 3), k, v  # queries broadcast over the windows

    def attend_windows(self, x: torch.Tensor, q_global: Optional[torch.Tensor],
                       key_padding: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention of :meth:`forward` before ``proj``, ``(B, num_windows, N, C)``.

        A method of its own so that ``qkv``, the largest tensor of the block (3x
        the tokens), is released when it returns, before ``proj`` allocates its
        output (a lower peak of memory).
        """
        q, k, v = self.split_qkv(x, q_global)
        mask = None if key_padding is None else key_padding[:, None, None, :]  # per window, shared by the images
        out = attention(q, k, v, self.scale, self.rel_pos().to(x.dtype), mask,
                        dropout=self.attn_drop if self.training else 0.0)
        return out.transpose(2, 3).reshape(x.shape)


class GCViTBlock(nn.Module):
    """Pre-norm transformer block: windowed (local or global-query) attention, then an MLP.

    Works on channels-last maps ``(B, H, W, C)`` of any size: the normalised
    map is zero-padded to a multiple of the window and the attention output
    cropped back before the residual sum.

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window side at run time.
        pretrain_window_size: window side of the relative position table.
        use_global: global-query attention instead of local attention.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        qkv_bias: bias on the ``qkv`` projection.
        layer_scale: initial layer-scale value (``None`` = no layer scale).
        drop_path: stochastic depth rate.
    """

    act_checkpoint = False  # see PyramidBackbone.set_act_checkpoint

    def __init__(self, dim: int, num_heads: int, window_size: int, pretrain_window_size: int, use_global: bool,
                 mlp_ratio: float = 3.0, qkv_bias: bool = True, layer_scale: Optional[float] = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GlobalContextAttention(dim, num_heads, window_size, pretrain_window_size, use_global, qkv_bias)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # timm's keys (fc1, fc2)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def _attention(self, x: torch.Tensor, q_global: Optional[torch.Tensor],
                   key_padding: Optional[torch.Tensor]) -> torch.Tensor:
        windows = self.attn(window_partition(x, self.window_size), q_global, key_padding)
        return window_unpartition(windows, self.window_size, (x.shape[1], x.shape[2]))

    def forward(self, x: torch.Tensor, q_global: Optional[torch.Tensor] = None,
                key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: ``x`` ``(B, H, W, C)``; ``q_global`` ``(B, N, C)``; ``key_padding`` ``(num_windows, N)`` or None."""
        x = x + self.drop_path1(self.ls1(self._attention(self.norm1(x), q_global, key_padding)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class GCViTStage(nn.Module):
    """Optional downsampler, global query generator, alternating blocks and optional closing LayerNorm.

    Args:
        in_dim: channels of the input map.
        dim: channels of the stage (``!= in_dim`` only with ``downsample``).
        depth: blocks.
        num_heads: attention heads.
        window_size: window side at run time.
        pretrain_window_size: the ImageNet window side of this stage.
        num_query_convs: Fused-MBConv blocks of the query generator.
        pool_steps: max-pool steps of the query generator.
        downsample: open with a :class:`ReduceSize` (``in_dim`` -> ``dim``, stride 2).
        stage_norm: close with a LayerNorm.
        mlp_ratio, qkv_bias, layer_scale: see :class:`GCViTBlock`.
        drop_path: per-block stochastic depth rates.
        mask_padding: exclude padded positions from the attention keys.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, window_size: int,
                 pretrain_window_size: int, num_query_convs: int, pool_steps: int, downsample: bool,
                 stage_norm: bool, mlp_ratio: float, qkv_bias: bool, layer_scale: Optional[float],
                 drop_path: Sequence[float], mask_padding: bool = False):
        super().__init__()
        self.window_size = window_size
        self.mask_padding = mask_padding
        self.num_heads = num_heads
        self.first_generation_queries = False  # see GCViT.first_generation_queries
        self.downsample = ReduceSize(in_dim, dim) if downsample else nn.Identity()
        self.global_block = GlobalQueryGenerator(dim, num_query_convs, pool_steps, window_size)
        self.blocks = nn.ModuleList([
            GCViTBlock(dim, num_heads, window_size, pretrain_window_size, use_global=i % 2 == 1,
                       mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, layer_scale=layer_scale, drop_path=drop_path[i])
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(dim) if stage_norm else nn.Identity()

    def key_padding_mask(self, hw: Tuple[int, int], device: torch.device) -> Optional[torch.Tensor]:
        """``(num_windows, N)`` bool, True at padded positions; None without ``mask_padding``."""
        if not self.mask_padding:
            return None
        valid = window_partition(torch.ones(1, hw[0], hw[1], 1, dtype=torch.bool, device=device), self.window_size)
        return ~valid.reshape(-1, self.window_size ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` to ``(B, C, H', W')``."""
        x = self.downsample(x)
        if self.first_generation_queries:
            q_global = first_generation_global_queries(self.global_block, x, self.num_heads)
        else:
            q_global = self.global_block(x)
        key_padding = self.key_padding_mask((x.shape[-2], x.shape[-1]), x.device)
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = checkpoint_block(blk, x, q_global, key_padding)
        return to_contiguous(self.norm(x).permute(0, 3, 1, 2))


class GCViT(PyramidBackbone):
    """GC ViT as a detectron2 backbone producing ``res2``-``res5`` (strides 4-32).

    Args:
        embed_dim: channels of the first stage (doubled in each later stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        mlp_ratio: MLP expansion.
        layer_scale: initial layer-scale value (small / base), or None.
        window_sizes: window side of each stage at run time; None = the
            ImageNet windows (exact classifier behaviour at 224). Detection
            configs use 24 in every stage.
        pretrain_window_sizes: the ImageNet windows, which fix the shapes of
            the relative position tables and the query generators.
        mask_padding: exclude window padding from the attention keys (the
            official detection code does not).
        qkv_bias: bias on the ``qkv`` projections.
        in_chans: image channels.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        out_features: levels to return.
        output_norm: extra LayerNorm on each returned level.
        freeze_at: see :class:`~.base.PyramidBackbone`.
    """

    no_weight_decay_keywords = ("relative_position_bias_table",)  # relative position bias tables: no weight decay

    def __init__(self, embed_dim: int = 64, depths: Sequence[int] = (3, 4, 19, 5),
                 num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio: float = 3.0,
                 layer_scale: Optional[float] = None, window_sizes: Optional[Sequence[int]] = None,
                 pretrain_window_sizes: Sequence[int] = IMAGENET_WINDOW_SIZES, mask_padding: bool = False,
                 qkv_bias: bool = True, in_chans: int = 3, drop_path_rate: float = 0.1,
                 out_features: Optional[Sequence[str]] = None, output_norm: bool = False, freeze_at: int = 0):
        super().__init__()
        pretrain_window_sizes = tuple(int(w) for w in pretrain_window_sizes)
        window_sizes = pretrain_window_sizes if window_sizes is None else tuple(int(w) for w in window_sizes)
        if len(window_sizes) != 4 or min(window_sizes) < 1:
            raise ValueError(f"GCViT: window_sizes must be 4 positive ints (one per stage), got {window_sizes}")
        if len(depths) != 4 or len(num_heads) != 4 or len(pretrain_window_sizes) != 4:
            raise ValueError("GCViT: depths, num_heads and pretrain_window_sizes need one entry per stage (4)")
        self.window_sizes = window_sizes
        self.pool_steps = global_query_pool_steps(window_sizes)
        query_convs = tuple(max(1, s) for s in global_query_pool_steps(pretrain_window_sizes))
        dims = [embed_dim * 2 ** i for i in range(4)]
        dpr = drop_path_rates(drop_path_rate, depths)

        self.stem = Stem(in_chans, embed_dim)
        self.stages = nn.Sequential(*[
            GCViTStage(
                in_dim=dims[max(i - 1, 0)], dim=dims[i], depth=depths[i], num_heads=num_heads[i],
                window_size=window_sizes[i], pretrain_window_size=pretrain_window_sizes[i],
                num_query_convs=max(query_convs[i], self.pool_steps[i]), pool_steps=self.pool_steps[i],
                downsample=i > 0, stage_norm=i == 3, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                layer_scale=layer_scale, drop_path=dpr[i], mask_padding=mask_padding)
            for i in range(4)
        ])
        self._init_pyramid(dims, out_features=out_features, output_norm=output_norm, freeze_at=freeze_at,
                           min_input_size=1)

    @property
    def first_generation_queries(self) -> bool:
        """Whether the global queries follow the first-generation official code (see the module docstring)."""
        return self.stages[0].first_generation_queries

    @first_generation_queries.setter
    def first_generation_queries(self, enabled: bool) -> None:
        for stage in self.stages:
            stage.first_generation_queries = bool(enabled)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.first_generation_queries:
            destination[prefix + FIRST_GENERATION_QUERIES_KEY] = torch.tensor(1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + FIRST_GENERATION_QUERIES_KEY
        if key in state_dict:
            self.first_generation_queries = bool(state_dict[key])
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        elif any(k.startswith(prefix + "stages.") for k in state_dict):  # weights without the entry
            self.first_generation_queries = False

    @classmethod
    def family_kwargs_from_cfg(cls, cfg) -> Dict:
        """``MODEL.PVT_D2.GCVIT.WINDOW_SIZES``: four window sides, or ``[]`` for the ImageNet windows."""
        windows = list(cfg.MODEL.PVT_D2.GCVIT.WINDOW_SIZES)
        return {"window_sizes": windows or None}

    def frozen_modules(self, freeze_at: int) -> List[nn.Module]:
        return [self.stem] + list(self.stages[:max(min(freeze_at - 1, 4), 0)])

    def forward_features(self, x: torch.Tensor, needed: Sequence[str]) -> Dict[str, torch.Tensor]:
        return self.run_stages(self.stem(x), self.stages, needed)


# ---------------------------------------------------------------------------
# Checkpoints: NVlabs/GCVit models/gc_vit.py, and timm's gcvit (= ours)
# ---------------------------------------------------------------------------
#: Official Fused-MBConv (``conv`` Sequential: dw conv, GELU, SE, pw conv) -> timm's MbConvBlock.
_OFFICIAL_MBCONV = (("conv.0.", "conv_dw."), ("conv.2.fc.0.", "se.fc1."), ("conv.2.fc.2.", "se.fc2."),
                 ("conv.3.", "conv_pw."))


def _mbconv_key(rest: str, prefix: str) -> Optional[str]:
    for old, new in _OFFICIAL_MBCONV:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return None


def _reduce_size_key(rest: str, prefix: str) -> str:
    """Official ReduceSize (norm1, conv, reduction, norm2) -> timm Downsample2d under ``prefix``."""
    return _mbconv_key(rest, prefix + "conv_block.") or prefix + rest


def _official_key(k: str) -> str:
    """The timm / pvt_d2 name of an official GC ViT key (unknown keys unchanged)."""
    if k.startswith("patch_embed.proj."):
        return "stem.conv1." + k[len("patch_embed.proj."):]
    if k.startswith("patch_embed.conv_down."):
        return _reduce_size_key(k[len("patch_embed.conv_down."):], "stem.down.")
    if k.startswith("norm."):
        return "stages.3.norm." + k[len("norm."):]
    m = re.fullmatch(r"levels\.(\d+)\.downsample\.(.+)", k)
    if m:
        return _reduce_size_key(m.group(2), f"stages.{int(m.group(1)) + 1}.downsample.")
    m = re.fullmatch(r"levels\.(\d+)\.(?:q_global_gen\.)?to_q_global\.(\d+)\.(.+)", k)
    if m:
        prefix = f"stages.{m.group(1)}.global_block.blocks.conv{int(m.group(2)) + 1}."
        return _mbconv_key(m.group(3), prefix) or k
    m = re.fullmatch(r"levels\.(\d+)\.blocks\.(\d+)\.(.+)", k)
    if m:
        rest = {"gamma1": "ls1.gamma", "gamma2": "ls2.gamma"}.get(m.group(3), m.group(3))
        rest = rest.replace("attn.relative_position_bias_table", "attn.rel_pos.relative_position_bias_table")
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"
    return k


def convert_official(state_dict):
    """NVlabs/GCViT names to timm's (= ours); drops head and relative_position_index buffers.

    Both official generations are read: ``levels.{i}.to_q_global`` and the
    later ``levels.{i}.q_global_gen.to_q_global``. The first generation's
    weights only give its features with its query layout (see
    :mod:`pvt_d2.modeling.backbone.gcvit`), so they get the
    ``first_generation_queries`` entry, which switches the model to that
    layout when they are loaded. The official downsampler
    closes level ``i``; ours opens stage ``i + 1``. The SE layers are Linear
    officially and 1x1 convs in timm. The top-level ``norm`` is the last
    stage's norm (it produces ``res5``), so it is kept.
    """

    def key_fn(k, v):
        if k.startswith("head.") or k.endswith("relative_position_index"):
            return None
        k = _official_key(k)
        if re.search(r"\.se\.fc[12]\.weight$", k) and v.dim() == 2:
            v = v[:, :, None, None]
        return k, v

    converted, dropped = apply_key_fn(state_dict, key_fn)
    if any(re.match(r"levels\.\d+\.to_q_global\.", k) for k in state_dict):
        converted[FIRST_GENERATION_QUERIES_KEY] = torch.tensor(1)
    return converted, dropped


def hparams_of_state_dict(sd):
    """The variant numbers read from a pvt_d2 state dict."""
    depths = blocks_per_stage(sd, r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight")
    dim = shape_at(sd, "stem.conv1.weight")
    heads = tuple(shape_at(sd, f"stages.{i}.blocks.0.attn.rel_pos.relative_position_bias_table", axis=1)
                  for i in range(len(depths)))
    return {"embed_dim": dim, "depths": depths, "num_heads": heads,
            "mlp_ratio": hidden_ratio(sd, "stages.0.blocks.0.mlp.fc1.weight", dim),
            "layer_scale": "stages.0.blocks.0.ls1.gamma" in sd}


def hparams_of_kwargs(kw):
    return {"embed_dim": kw["embed_dim"], "depths": as_tuple(kw["depths"]), "num_heads": as_tuple(kw["num_heads"]),
            "mlp_ratio": float(kw["mlp_ratio"]), "layer_scale": kw.get("layer_scale") is not None}


CHECKPOINT_MAPPING = register_mapping(FamilyMapping(
    "gcvit", "GC ViT",
    markers={"official": (r"^patch_embed\.conv_down\.reduction\.weight$",
                          r"^levels\.0\.blocks\.0\.attn\.qkv\.weight$"),
             "timm": (r"^stem\.down\.conv_block\.conv_dw\.weight$",
                      r"^stages\.0\.blocks\.0\.attn\.rel_pos\.relative_position_bias_table$")},
    converters={"official": convert_official, "timm": dropping("head.")},
    hparams=hparams_of_state_dict, hparams_of_kwargs=hparams_of_kwargs))


# ---------------------------------------------------------------------------
# Variants: architecture, ImageNet weights, detection and published numbers
# ---------------------------------------------------------------------------
_CONFIGS = "NVlabs/GCVit detection/configs/gcvit/"
_SMALL = dict(depths=(3, 4, 19, 5), mlp_ratio=2.0, layer_scale=1e-5)
_TINY_CONFIGS = {"mask_rcnn_3x": _CONFIGS + "mask_rcnn_gcvit_tiny_3x_coco.py",
                 "cascade_mask_rcnn_3x": _CONFIGS + "cascade_mask_rcnn_gcvit_tiny_3x_coco.py"}


def _weights(file: str) -> Weights:
    """NVIDIA's weights as timm re-publishes them (NVlabs/GCVit links Google Drive and nvidia/GCViT on Hugging Face)."""
    return Weights(f"https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights-morevit/{file}.pth",
                   f"{file}.pth", "timm",
                   note="NVlabs/GCVit links Google Drive and nvidia/GCViT on Hugging Face; timm's direct copy")


def _valid_windows(windows) -> bool:
    """``MODEL.PVT_D2.GCVIT.WINDOW_SIZES``: ``[]`` or one positive integer per stage."""
    return not windows or (len(windows) == 4 and all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in windows))


MANIFEST = register_family(FamilyManifest(
    GCViT, CHECKPOINT_MAPPING,
    variants=(
        Variant("gcvit_xxtiny", dict(embed_dim=64, depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16)),
                _weights("gcvit_xxtiny_224_nvidia-d1d86009"), short="gcvit_xxt", drop_path=0.2),
        Variant("gcvit_xtiny", dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16)),
                _weights("gcvit_xtiny_224_nvidia-274b92b7"), short="gcvit_xt", drop_path=0.2),
        # drop path: NVlabs/GCVit gcvit/*_gcvit_tiny_3x_coco.py
        Variant("gcvit_tiny", dict(embed_dim=64, depths=(3, 4, 19, 5), num_heads=(2, 4, 8, 16)),
                _weights("gcvit_tiny_224_nvidia-ac783954"), short="gcvit_t", drop_path=0.2,
                official_configs=_TINY_CONFIGS,
                published_ap={"mask_rcnn_3x": "47.9 / 43.2", "cascade_mask_rcnn_3x": "51.6 / 44.6"},
                published_params={"mask_rcnn_3x": 48.0, "cascade_mask_rcnn_3x": 85.0}),
        Variant("gcvit_small", dict(_SMALL, embed_dim=96, num_heads=(3, 6, 12, 24)),
                _weights("gcvit_small_224_nvidia-4e98afa2"), short="gcvit_s", drop_path=0.3,
                published_ap={"cascade_mask_rcnn_3x": "52.4 / 45.4"},
                published_params={"cascade_mask_rcnn_3x": 108.0}),
        Variant("gcvit_base", dict(_SMALL, embed_dim=128, num_heads=(4, 8, 16, 32)),
                _weights("gcvit_base_224_nvidia-f009139b"), short="gcvit_b", drop_path=0.5,
                published_ap={"cascade_mask_rcnn_3x": "52.9 / 45.8"},
                published_params={"cascade_mask_rcnn_3x": 146.0}),
    ),
    options=(Option("WINDOW_SIZES", check=_valid_windows,
                    allowed="give [] (the ImageNet windows) or 4 positive integers, one per stage"),),
    # the official detection code's window 24 in every stage (NVlabs/GCVit detection/configs/gcvit/*.py)
    detection_cfg={"GCVIT.WINDOW_SIZES": [24, 24, 24, 24]},
    recipe={"3x": {"WARMUP_ITERS": 2500}},  # NVlabs/GCVit schedule_3x.py
    modelled_on=_TINY_CONFIGS,
    paper='A. Hatamizadeh et al., "Global Context Vision Transformers", ICML 2023',
    cite="Hatamizadeh et al., ICML 2023", params_source="NVlabs/GCVit detection/README.md"))
