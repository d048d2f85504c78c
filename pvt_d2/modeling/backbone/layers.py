"""Building blocks shared by several backbone families.

Everything that more than one family needs lives here once: resizing of
learned position embeddings, channels-first LayerNorm, the softmax attention
core, and PVT's spatial-reduction attention, MLP and patch embedding (also
used by PVT v2, Twins and GC ViT). Shape arithmetic that must stay symbolic
while a model is recorded is in :mod:`.export_ops`; the CPU inference kernels
that replace some of these modules are in :mod:`pvt_d2.inference`.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from timm.layers import trunc_normal_
from torch import nn

from .export_ops import contiguous_nchw, is_tracing, map_to_tokens, pad_to_at_least, pad_to_multiple, tokens_to_map

__all__ = [
    "attention",
    "conv_input",
    "resize_pos_embed",
    "LayerNorm2d",
    "SpatialReductionAttention",
    "Mlp",
    "PatchEmbed",
    "init_weights",
]


def conv_input(x: torch.Tensor) -> torch.Tensor:
    """A token map (the channels-last view of :func:`~.export_ops.tokens_to_map`) laid out as a conv uses it.

    The reference implementations pass that view straight to their convs.
    ATen then convolves in channels-last, except for a one-image batch, which
    it convolves in NCHW after an element-wise copy: that copy is made here
    by :func:`~.export_ops.contiguous_nchw` (faster, same values), so the conv
    sums exactly as in the reference.
    """
    return contiguous_nchw(x) if x.shape[0] == 1 else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None,
              mask: Optional[torch.Tensor] = None, dropout: float = 0.0, key_scale: Optional[float] = None,
              inplace: bool = False) -> torch.Tensor:
    """Softmax attention written out as two matmuls around a softmax, as timm's models do.

    With a float bias on 5-d inputs SDPA takes its generic CPU path, which
    adds guards against fully masked rows; none occur in the models here.

    Args:
        q, k, v: ``(..., N, d)`` queries and ``(..., M, d)`` keys and values.
        scale: factor on the queries.
        bias: additive bias broadcast to the ``(..., N, M)`` scores.
        mask: bool, broadcast to the scores, True where a key is excluded.
        dropout: dropout on the attention weights.
        key_scale: factor on the keys as well (SDPA's math kernel scales both
            by the root of the scale).
        inplace: add the bias and the mask to the scores in place (inference).

    Returns:
        ``(..., N, d_v)``.
    """
    kt = k.transpose(-2, -1)
    attn = torch.matmul(q * scale, kt if key_scale is None else kt * key_scale)
    if bias is not None:
        bias = bias.to(attn.dtype)
        attn = attn.add_(bias) if inplace else attn + bias
    if mask is not None:
        attn = attn.masked_fill_(mask, float("-inf")) if inplace else attn.masked_fill(mask, float("-inf"))
    attn = attn.softmax(dim=-1)
    if dropout > 0:
        attn = F.dropout(attn, dropout)
    return torch.matmul(attn, v)


def resize_pos_embed(pos_embed: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int],
                     num_prefix_tokens: int = 0, mode: str = "bilinear") -> torch.Tensor:
    """Resample a learned absolute position embedding to another token grid.

    Not timm's ``resample_abs_pos_embed``: that one interpolates in float32
    (a float64 model would lose precision), keeps the prefix tokens and resamples
    under ``torch.jit.trace`` only when the sizes differ.

    Args:
        pos_embed: ``(1, num_prefix_tokens + src_h * src_w, C)``.
        src_hw: grid the embedding was learned for.
        dst_hw: grid of the current input.
        num_prefix_tokens: leading tokens (class token slots) that are dropped.
        mode: interpolation mode for :func:`torch.nn.functional.interpolate`.

    Returns:
        ``(1, dst_h * dst_w, C)`` (a strided view, ready to be added to tokens);
        the input itself (minus prefix tokens) when the grids already agree.
        While tracing / exporting it always resamples (an exact identity at
        the same size), so the recorded graph follows the input size.
    """
    grid = pos_embed[:, num_prefix_tokens:]
    if not is_tracing() and tuple(src_hw) == tuple(dst_hw):
        return grid
    c = grid.shape[-1]
    grid = grid.reshape(1, src_hw[0], src_hw[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(dst_hw[0], dst_hw[1]), mode=mode, align_corners=False)
    return map_to_tokens(grid)


class LayerNorm2d(_TimmLayerNorm2d):
    """timm's LayerNorm over the channels of a ``(B, C, H, W)`` map, with ``nn.LayerNorm``'s default eps.

    The default ``eps`` is 1e-5 (timm's is 1e-6), as in the official GC ViT and
    ViP code whose norms this class stands for.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_channels, eps=eps, affine=affine)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from a spatially reduced map.

    PVT's SRA: queries are all ``N = H*W`` tokens; keys and values are computed
    from the map reduced by a ``sr_ratio`` x ``sr_ratio`` strided conv followed by
    LayerNorm, so attention costs ``N * N / sr_ratio**2``. With ``linear=True``
    (PVT v2 "li" variants) the reduction is an adaptive average pool to 7x7, a
    1x1 conv, LayerNorm and GELU instead. The same module is Twins' global
    sub-sampled attention. Parameter names (``q``, ``kv``, ``proj``, ``sr``,
    ``norm``) follow the official PVT code, so its checkpoints load unchanged.

    Args:
        dim: channels of the tokens.
        num_heads: attention heads.
        sr_ratio: spatial reduction ratio (1 = plain global attention).
        qkv_bias: add a bias to the query and key/value projections.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
        linear: use PVT v2's linear (pooling) reduction.
        pool_size: output side of the pooling in linear mode.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, linear: bool = False, pool_size: int = 7):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.linear = linear
        self.sr_ratio = sr_ratio
        if linear:
            self.pool = nn.AdaptiveAvgPool2d(pool_size)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def reduce(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, N, C)`` to the reduced key/value tokens ``(B, M, C)``.

        In conv mode the strided conv drops a border that does not fill a
        whole ``sr_ratio`` cell, exactly as the reference implementations do; a
        side shorter than ``sr_ratio`` (tiny images) is zero-padded up to it so
        that there is always at least one key/value token.
        """
        if self.linear:
            y = self.pool(tokens_to_map(x, hw))
            return self.act(self.norm(map_to_tokens(self.sr(y))))
        if self.sr_ratio > 1:
            return self.reduce_map(self.reduction_input(x, hw))
        return x

    def reduction_input(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The map the conv reduction reads: :func:`conv_input` of the tokens' map."""
        return conv_input(tokens_to_map(x, hw))

    def reduce_map(self, y: torch.Tensor) -> torch.Tensor:
        """Conv reduction of a ``(B, C, H, W)`` map to normalised key/value tokens."""
        return self.norm(map_to_tokens(self.sr(pad_to_at_least(y, self.sr_ratio))))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SDPA of ``(B, heads, N, d)`` queries on the keys and values; ``(B, N, C)`` out."""
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                             scale=self.scale)
        b, heads, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, heads * d)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Attend from ``x`` (``(B, H*W, C)``, grid ``hw``) to its reduced map."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        kv = self.kv(self.reduce(x, hw)).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        return self.proj_drop(self.proj(self.attend(q, kv[0], kv[1])))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding for any input size (PVT v1, Twins).

    The map is zero-padded at the bottom/right to a multiple of
    ``patch_size``, projected by a ``patch_size`` x ``patch_size`` conv of the
    same stride and normalized per token, so the grid is exactly
    ``ceil(H / patch_size)`` x ``ceil(W / patch_size)``.

    Args:
        in_chans: input channels.
        dim: output channels.
        patch_size: side (and stride) of a patch.
        nchw_conv: run the conv on a contiguous ``(B, C, H, W)`` copy of the
            input, as the reference of Twins does between its stages.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int, nchw_conv: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.nchw_conv = nchw_conv
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``(B, C, H, W)`` map to ``(B, N, dim)`` tokens and their grid size."""
        return self.embed(contiguous_nchw(x) if self.nchw_conv else x)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Pad, project and normalise ``x`` as laid out."""
        x, _ = pad_to_multiple(x, self.patch_size)
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(map_to_tokens(x)), hw


class Mlp(nn.Module):
    """Token MLP: fc1, GELU, fc2; optionally PVT v2's 3x3 depthwise conv after fc1.

    Key names (``fc1``, ``dwconv``, ``fc2``) are those of the official PVT /
    Twins code and of timm.

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels.
        dwconv: insert a 3x3 depthwise conv (with the token grid) after fc1.
        extra_relu: a ReLU after fc1 (PVT v2 "li" variants).
        drop: dropout after the activation and after fc2.
    """

    def __init__(self, dim: int, hidden_dim: int, dwconv: bool = False, extra_relu: bool = False, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``(B, N, C)`` tokens (on grid ``hw``, needed with ``dwconv``) to ``(B, N, C)``.

        Without ``dwconv`` any leading dimensions are accepted: ``(..., C)`` to ``(..., C)``.
        """
        x = self.relu(self.fc1(x))
        if self.dwconv is not None:
            x = map_to_tokens(self.dwconv(tokens_to_map(x, hw)))  # channels-last: no layout copies
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


def init_weights(m: nn.Module) -> None:
    """The usual transformer initialisation, for ``model.apply``.

    Linear: truncated normal (std 0.02), zero bias. LayerNorm: unit scale,
    zero shift. Conv2d: normal with std ``sqrt(2 / fan_out)``, zero bias.
    """
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

