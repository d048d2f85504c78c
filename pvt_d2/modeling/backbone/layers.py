"""Building blocks shared by several backbone families.

Everything that more than one family needs lives here exactly once: padding to
a multiple, window partition and its inverse, resizing of learned position
embeddings, channels-first LayerNorm, and the spatial-reduction attention of
PVT (also used by PVT v2 and Twins).

Layout. Token sequences ``(B, H*W, C)`` and feature maps ``(B, C, H, W)`` are
two views of the same memory when the map is *channels-last*:
:func:`tokens_to_map` returns such a view and :func:`map_to_tokens` turns a
channels-last map back into contiguous tokens, both without copying. Convs
fed a channels-last map produce a channels-last map (oneDNN on the CPU, cuDNN
on GPUs), so a stage can go tokens -> conv -> tokens with no layout copies.

Memory. Large activations cost more to allocate (fresh pages) than to
compute on; in inference (no autograd graph being recorded) the MLP's GELU
and the residual additions therefore run in place (:func:`inference_inplace`),
with bit-identical results.

Export. Size-dependent steps (padding to a multiple, the small-grid padding of
the spatial reduction, position-embedding resizing) take the general path
while :func:`torch.jit.trace` or :func:`torch.export.export` records the
model (:func:`is_tracing`): zero-width pads and same-size resizes are exact
no-ops, and the recorded graph then follows the input size instead of baking
in the branch taken at the example size.
"""
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d as _TimmLayerNorm2d
from timm.layers import trunc_normal_
from torch import nn

__all__ = [
    "is_tracing",
    "inference_inplace",
    "residual_add",
    "pad_to_multiple",
    "window_partition",
    "window_unpartition",
    "crop_to",
    "to_contiguous",
    "contiguous_nchw",
    "conv_input",
    "resize_pos_embed",
    "attention_chunks",
    "image_by_image",
    "bf16_attention",
    "is_cpu_bf16_inference",
    "LayerNorm2d",
    "Linear",
    "packed_linear",
    "FUSED_ACTIVATIONS",
    "SpatialReductionAttention",
    "Mlp",
    "PatchEmbed",
    "tokens_to_map",
    "map_to_tokens",
    "init_weights",
]


def is_tracing() -> bool:
    """True while :func:`torch.jit.trace`, :func:`torch.export.export` or ``torch.compile`` records the model."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def inference_inplace(x: torch.Tensor) -> bool:
    """Whether ``x`` may be overwritten by an in-place op: no autograd graph needs it and nothing is recorded."""
    return not (torch.is_grad_enabled() and x.requires_grad) and not is_tracing()


def residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``, accumulated into the freshly computed ``branch`` in inference (no new allocation)."""
    if inference_inplace(branch) and branch.shape == x.shape:
        return branch.add_(x)
    return x + branch


def _clamp_min_zero(v):
    """``max(v, 0)`` for a Python int, a ``SymInt`` (export) or a traced size (``jit.trace``, a 0-d tensor)."""
    if isinstance(v, torch.Tensor):
        return v.clamp(min=0)
    return torch.sym_max(v, 0)


def pad_to_multiple(x: torch.Tensor, multiple: int,
                    channels_last: bool = False) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad the bottom/right of a feature map so both sides divide ``multiple``.

    Args:
        x: ``(B, C, H, W)`` tensor, or ``(B, H, W, C)`` when ``channels_last``.
        multiple: the required divisor of height and width.
        channels_last: layout of ``x``.

    Returns:
        The padded tensor and the number of padded rows and columns ``(pad_h, pad_w)``.
    """
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    # ceil(h / m) * m - h as a floor division of non-negative sizes: torch.export's symbolic
    # sizes follow and simplify it (a nested modulo grows stage after stage), and ONNX's
    # integer Div (which truncates) computes it right.
    pad_h = (h + multiple - 1) // multiple * multiple - h
    pad_w = (w + multiple - 1) // multiple * multiple - w
    if is_tracing() or pad_h or pad_w:
        if channels_last:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        else:
            x = F.pad(x, (0, pad_w, 0, pad_h))
    return x, (pad_h, pad_w)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Split a channels-last map into non-overlapping square windows.

    Args:
        x: ``(B, H, W, C)`` with ``H`` and ``W`` divisible by ``window_size``
            (see :func:`pad_to_multiple`).
        window_size: side of a window.

    Returns:
        ``(B * num_windows, window_size, window_size, C)``.
    """
    b, h, w, c = x.shape
    nh, nw = h // window_size, w // window_size
    x = x.view(b, nh, window_size, nw, window_size, c)
    # Sizes spelled out (no -1) and an explicit copy: torch.export then follows any window
    # count (a reshape would be a view for a single window row or column, a copy otherwise).
    return to_contiguous(x.permute(0, 1, 3, 2, 4, 5)).view(b * nh * nw, window_size, window_size, c)


def window_unpartition(windows: torch.Tensor, window_size: int, hw: Tuple[int, int],
                       batch: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: ``(B * num_windows, window_size, window_size, C)``.
        window_size: side of a window.
        hw: the (padded) height and width the windows were cut from.
        batch: ``B`` when known (spares torch.export a division of symbolic sizes).

    Returns:
        ``(B, H, W, C)``.
    """
    h, w = hw
    nh, nw = h // window_size, w // window_size
    b = windows.shape[0] // (nh * nw) if batch is None else batch
    c = windows.shape[-1]
    x = windows.view(b, nh, nw, window_size, window_size, c)
    return to_contiguous(x.permute(0, 1, 3, 2, 4, 5)).view(b, h, w, c)


def to_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``; while :func:`torch.export.export` records the model, always a copy.

    ``contiguous()`` asks whether ``x`` already is, which for a permuted map
    depends on whether a side is 1 (one window, a 1-pixel level): under
    :func:`torch.export.export` that question becomes a guard on the input
    size. A copy in the contiguous layout has the same values and shape.
    """
    if torch.compiler.is_compiling():
        return x.clone(memory_format=torch.contiguous_format)
    return x.contiguous()


def contiguous_nchw(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``(B, C, H, W)`` map with the values of ``x`` (``x`` itself when it already is).

    A channels-last map (the view :func:`tokens_to_map` returns) is copied
    image by image as 2-d ``(H*W, C) -> (C, H*W)`` transposes, which ATen
    copies in cache-sized blocks: ~2x faster than ``x.contiguous()``'s
    element-wise permuted copy on detection-size maps, same values. While
    recording (:func:`is_tracing`): :func:`to_contiguous`.
    """
    if (is_tracing() or x.dim() != 4 or x.is_contiguous()
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return to_contiguous(x)
    b, c, h, w = x.shape
    out = x.new_empty(b, c, h * w)
    for i in range(b):
        out[i].copy_(x[i].reshape(c, h * w))  # a transposed view of the image's (H*W, C) tokens
    return out.view(b, c, h, w)


def conv_input(x: torch.Tensor, keep_view: bool = False) -> torch.Tensor:
    """A token map (the channels-last view of :func:`tokens_to_map`) laid out as a convolution uses it.

    The reference implementations pass that view straight to their convs.
    ATen then convolves in channels-last, except for a one-image batch of
    their token layout, which it convolves in NCHW after an element-wise
    copy: that copy is made here by :func:`contiguous_nchw` (faster, same
    values). Either way the conv sums exactly as in the reference
    (``tests/test_twins.py`` checks it against timm bit for bit).

    Args:
        x: the channels-last view.
        keep_view: return ``x`` for one image too (the fast inference
            kernels, see :meth:`~.base.PyramidBackbone.set_fast_inference`):
            the conv then runs channels-last with a channels-last output,
            which :func:`map_to_tokens` reads without a copy (at 800x1344 the
            stage-1 PEG of Twins: copy + NCHW depthwise conv + copy back
            ~50 ms -> ~3 ms), summing in another order (~1e-6 relative).
    """
    return contiguous_nchw(x) if x.shape[0] == 1 and not keep_view else x


def crop_to(x: torch.Tensor, hw: Tuple[int, int], channels_last: bool = False) -> torch.Tensor:
    """The top-left ``hw`` of a map padded by :func:`pad_to_multiple` (``(B, C, H, W)`` or channels-last).

    A slice (a view), also in a :func:`torch.jit.trace` (and so in ONNX).
    While :func:`torch.export.export` records the model, an ``index_select``
    of the first rows and columns instead: its output size is the index
    length, which export follows without having to prove
    ``h <= ceil(h / m) * m`` (which its symbolic reasoning cannot).
    """
    h, w = hw
    if torch.compiler.is_compiling():
        hdim, wdim = (1, 2) if channels_last else (2, 3)
        x = x.index_select(hdim, torch.arange(h, device=x.device))
        return x.index_select(wdim, torch.arange(w, device=x.device))
    return x[:, :h, :w] if channels_last else x[:, :, :h, :w]


def tokens_to_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens to a ``(B, C, H, W)`` map.

    For contiguous tokens the result is a channels-last view of the same
    memory (no copy); call ``.contiguous()`` on it where a plain NCHW tensor
    is required.
    """
    b, _, c = x.shape
    return x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` map to ``(B, H*W, C)`` tokens (contiguous, without a copy, for a channels-last map).

    While :func:`torch.export.export` records the model, an explicit copy:
    whether ``flatten`` can be a view depends on whether a side is 1, a guard
    on the input size there.
    """
    if torch.compiler.is_compiling():
        b, c, h, w = x.shape
        return to_contiguous(x.permute(0, 2, 3, 1)).view(b, h * w, c)
    return x.flatten(2).transpose(1, 2)


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

    #: Inference convolves one image's map in its channels-last layout (:func:`conv_input`); see
    #: :meth:`~.base.PyramidBackbone.set_fast_inference`.
    fast_inference = True

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, linear: bool = False, pool_size: int = 7):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
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
            y = conv_input(tokens_to_map(x, hw), keep_view=self.fast_inference and inference_inplace(x))
            if torch.compiler.is_compiling():
                # torch.export / compile: symbolic sizes; the program asserts at run
                # time that the grid is not smaller than one reduction cell.
                torch._check(hw[0] >= self.sr_ratio)
                torch._check(hw[1] >= self.sr_ratio)
            else:
                pad_h, pad_w = _clamp_min_zero(self.sr_ratio - hw[0]), _clamp_min_zero(self.sr_ratio - hw[1])
                if torch.jit.is_tracing() or pad_h or pad_w:
                    y = F.pad(y, (0, pad_w, 0, pad_h))
            return self.norm(map_to_tokens(self.sr(y)))
        return x

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Attend from ``x`` (``(B, H*W, C)``, grid ``hw``) to its reduced map."""
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q(x).reshape(b, n, heads, c // heads).transpose(1, 2)
        kv = self.kv(self.reduce(x, hw)).reshape(b, -1, 2, heads, c // heads).permute(2, 0, 3, 1, 4)
        if is_cpu_bf16_inference(q):
            out = bf16_attention(q, kv[0], kv[1], self.scale).view(b, n, c)
        else:
            out = F.scaled_dot_product_attention(
                q, kv[0], kv[1], dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
            out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


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
            input, as the reference of Twins does between its stages. Not in
            the fast inference kernels (:attr:`fast_inference`, see
            :meth:`~.base.PyramidBackbone.set_fast_inference`): there the
            conv reads the previous stage's channels-last view and writes a
            channels-last map, which becomes tokens without a copy (Twins SVT
            at 224, batch 8: stages 2-4's patch embeddings 29 -> 11 ms),
            summing in another order (~1e-6 relative).
    """

    #: See ``nchw_conv``.
    fast_inference = True

    def __init__(self, in_chans: int, dim: int, patch_size: int, nchw_conv: bool = False):
        super().__init__()
        self.patch_size = patch_size
        self.nchw_conv = nchw_conv
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``(B, C, H, W)`` map to ``(B, N, dim)`` tokens and their grid size."""
        if self.nchw_conv and not (self.fast_inference and inference_inplace(x)):
            x = contiguous_nchw(x)
        x, _ = pad_to_multiple(x, self.patch_size)
        x = self.proj(x)
        hw = (x.shape[-2], x.shape[-1])
        return self.norm(map_to_tokens(x)), hw


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


#: Activations :func:`packed_linear` applies inside the GEMM: name -> (function, oneDNN post-op, its algorithm).
FUSED_ACTIVATIONS = {"gelu": (F.gelu, "gelu", "none"), "hardswish": (F.hardswish, "hardswish", "")}


def _packed_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype :func:`packed_linear` computes in (float32, or bfloat16 under CPU autocast), or None."""
    if weight.dtype != torch.float32 or not _onednn_linear_available():
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    # CPU autocast: what F.linear would compute in, where oneDNN has bfloat16 kernels
    if (torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return None


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], packs: dict,
                  activation: Optional[str] = None, enabled: bool = True) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))``, through a oneDNN-packed copy of ``weight`` where it applies.

    See :class:`Linear`, the module form. Float32 CPU inputs, and under CPU
    autocast to bfloat16 float32 / bfloat16 inputs (computed in bfloat16 as
    ``F.linear`` would under autocast, from a bfloat16 copy of the weight
    packed once instead of a cast on every call). ``packs`` is the caller's
    cache (an empty dict at first): one pack per compute dtype, reused while
    ``weight`` (and ``bias``) are the same tensor objects on the same storage
    at the same versions (in-place updates, e.g. loading weights, bump them). ``activation`` is
    None or a key of :data:`FUSED_ACTIVATIONS` (exact GELU, hardswish),
    applied by the GEMM to its output tile while it is in cache.
    ``enabled=False`` always takes the plain path.
    """
    # is_tracing first: while recording, no size test may enter the graph
    dtype = None
    if (enabled and not is_tracing() and x.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and x.is_contiguous()):
        dtype = _packed_dtype(x, weight)
    if dtype is None:
        y = F.linear(x, weight, bias)
        return y if activation is None else FUSED_ACTIVATIONS[activation][0](y)
    # storage and version: `param.data = ...` (e.g. Module.to) swaps the storage without a version bump
    versions = tuple((t.data_ptr(), t._version) if t is not None else None for t in (weight, bias))
    pack = packs.get(dtype)
    if pack is None or pack["weight"] is not weight or pack["bias"] is not bias or pack["versions"] != versions:
        pack = packs[dtype] = {  # new or changed weight / bias
            "weight": weight, "bias": bias, "versions": versions,
            "packed": torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype)),
            "packed_bias": None if bias is None else bias.detach().to(dtype)}
    attr, algorithm = ("none", "") if activation is None else FUSED_ACTIVATIONS[activation][1:]
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), pack["packed"], pack["packed_bias"], attr, [], algorithm)


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU float32 inference runs oneDNN's GEMM on a weight packed once.

    ``nn.Linear`` on the CPU calls MKL's ``sgemm`` (``addmm``), which repacks
    the weight into its blocked layout on every call. In inference the weight
    does not change, so this module packs it once for oneDNN
    (``torch.ops.mkldnn._reorder_linear_weight``) and calls oneDNN's packed
    GEMM (``torch.ops.mkldnn._linear_pointwise``), the prepacked linear of
    ``torch.compile``'s CPU backend. On this machine's AMD EPYC it runs the
    linears of the models here 10-25% faster than ``addmm`` (one and two
    threads, 392 to 25088 rows); the per-row results do not depend on the
    row count (chunked MLPs stay bit-identical to unchunked ones), and they
    equal ``addmm``'s for inputs of up to 128 channels and differ by float
    rounding (~1e-6 relative) above, where the two libraries block the sum
    differently. :meth:`forward_act` also applies the following GELU /
    hardswish inside the GEMM (GELU bit-identical to applying it after,
    hardswish within 1.2e-7).

    Only calls autograd does not record take this path (inference, or a
    frozen layer in training): a layer being trained, autocast, other dtypes
    and devices, non-contiguous inputs and recording (:func:`is_tracing`)
    run ``nn.Linear``'s ``addmm``; so does every call
    with :attr:`fast_inference` off (see
    :meth:`~.base.PyramidBackbone.set_fast_inference`, e.g. to reproduce
    another ``addmm``-based implementation bit for bit). The pack costs the
    weight's size in memory, is rebuilt when the weight changes (in-place
    updates bump its version) and is not part of the state dict, pickles or
    copies.
    """

    #: Whether inference uses the packed oneDNN GEMM; see :meth:`~.base.PyramidBackbone.set_fast_inference`.
    fast_inference = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_act(x)

    def forward_act(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        """``activation(self(x))``; ``activation`` is None or a key of :data:`FUSED_ACTIVATIONS`."""
        return packed_linear(x, self.weight, self.bias, self.__dict__.setdefault("_packs", {}), activation,
                             self.fast_inference)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_packs", None)  # oneDNN-packed tensors can be neither pickled nor deep-copied
        return state


class Mlp(nn.Module):
    """Token MLP: fc1, GELU, fc2; optionally PVT v2's 3x3 depthwise conv after fc1.

    Key names (``fc1``, ``dwconv``, ``fc2``) are those of the official PVT /
    Twins code and of timm.

    Inference (no autograd graph, no active dropout) on a large input runs
    the MLP over chunks of about :attr:`chunk_numel` hidden activations: runs
    of tokens, or with the depthwise conv whole images or bands of image rows
    (plus one halo row above and below), and concatenates the chunks'
    ``fc2`` outputs. The hidden activations, the largest tensors of the block
    (4-8x the tokens), then never exist in full: they stay in the caches and
    in memory the allocator reuses, instead of fresh pages whose first touch
    costs more than the GELU computed on them (the PVT v2 MLP at 224x224,
    batch 8, stage 1 runs ~1.5x faster). Each output token sees exactly the
    operands of the whole-tensor computation (the same GEMM rows, the same
    3x3 neighbourhood), and the results are bit-identical in practice. The
    GELU runs inside ``fc1``'s GEMM when it follows ``fc1`` directly
    (:meth:`Linear.forward_act`), otherwise in place on the hidden activations.

    Args:
        dim: input and output channels.
        hidden_dim: hidden channels.
        dwconv: insert a 3x3 depthwise conv (with the token grid) after fc1.
        extra_relu: a ReLU after fc1 (PVT v2 "li" variants).
        drop: dropout after the activation and after fc2.
    """

    def __init__(self, dim: int, hidden_dim: int, dwconv: bool = False, extra_relu: bool = False, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim) if dwconv else None
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    #: Hidden activations per chunk of the inference path (elements; 4 MB in float32).
    chunk_numel = 2 ** 20
    #: The inference path chunks only MLPs whose whole hidden tensor has more elements than this.
    min_chunked_numel = 6 * 2 ** 20
    #: Fewest image rows per band (the halo rows are computed twice: at most 2 in 14 here).
    min_band_rows = 12

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """``(B, N, C)`` tokens (on grid ``hw``, needed with ``dwconv``) to ``(B, N, C)``.

        Without ``dwconv`` any leading dimensions are accepted: ``(..., C)`` to ``(..., C)``.
        """
        # inference_inplace first: it is False while recording, so no size test enters a traced graph
        if (inference_inplace(x) and x.numel() // x.shape[-1] * self.fc1.out_features > self.min_chunked_numel
                and x.is_contiguous() and not (self.training and self.drop.p > 0)):
            return self._forward_chunked(x, hw)
        if self._fused_gelu():
            x = self.fc1.forward_act(x, "gelu")
        else:
            x = self.relu(self.fc1(x))
            if self.dwconv is not None:
                x = map_to_tokens(self.dwconv(tokens_to_map(x, hw)))  # channels-last: no layout copies
            if inference_inplace(x) and x.is_contiguous():
                x = torch.ops.aten.gelu_(x, approximate=self.act.approximate)
            else:
                x = self.act(x)
        x = self.drop(x)
        return self.drop(self.fc2(x))

    def _fused_gelu(self) -> bool:
        """Whether the GELU follows ``fc1`` directly, so that ``fc1`` can apply it (:meth:`Linear.forward_act`)."""
        return self.dwconv is None and isinstance(self.relu, nn.Identity) and self.act.approximate == "none"

    def _chunk(self, hidden: torch.Tensor) -> torch.Tensor:
        """GELU (in place) and ``fc2`` of ``(M, hidden_dim)`` activations."""
        return self.fc2(torch.ops.aten.gelu_(hidden, approximate=self.act.approximate))

    def _forward_chunked(self, x: torch.Tensor, hw: Optional[Tuple[int, int]]) -> torch.Tensor:
        """The inference path of :meth:`forward`: chunks of tokens, whole images or bands of image rows."""
        chunk = max(1, self.chunk_numel // self.fc1.out_features)  # tokens
        if self.dwconv is None:  # any leading dimensions
            tokens = x.view(-1, x.shape[-1])
            step = _even_step(tokens.shape[0], chunk)
            out = None
            fused = self._fused_gelu()
            for start in range(0, tokens.shape[0], step):
                part = tokens[start:start + step]
                y = self.fc2(self.fc1.forward_act(part, "gelu")) if fused else self._chunk(self.relu(self.fc1(part)))
                if out is None:  # the dtype of the result (autocast)
                    out = y.new_empty(tokens.shape[0], y.shape[-1])
                out[start:start + step] = y
            return out.view(*x.shape[:-1], -1)
        b, n, _ = x.shape
        h, w = hw
        if n <= chunk:  # whole images
            step = _even_step(b, chunk // n)
            return torch.cat([self._band(x[i:i + step], hw, 0, h) for i in range(0, b, step)])
        step = _even_step(h, max(self.min_band_rows, chunk // w))
        bands = [self._band(x[i:i + 1], hw, top, min(top + step, h)) for i in range(b) for top in range(0, h, step)]
        return torch.cat(bands, dim=1).view(b, n, -1)  # the images' bands in order

    def _band(self, x: torch.Tensor, hw: Tuple[int, int], top: int, bottom: int) -> torch.Tensor:
        """The MLP output of image rows ``top:bottom`` of ``x`` (``(B, H*W, C)`` tokens on grid ``hw``)."""
        h, w = hw
        # One halo row above and below (where the image has one) for the 3x3 conv.
        lo, hi = max(top - 1, 0), min(bottom + 1, h)
        hidden = self.relu(self.fc1(x[:, lo * w:hi * w]))
        hidden = self.dwconv(tokens_to_map(hidden, (hi - lo, w)))
        hidden = map_to_tokens(hidden[:, :, top - lo:bottom - lo])  # channels-last: a view
        return self._chunk(hidden)


def _even_step(total: int, most: int) -> int:
    """The step that splits ``total`` into as few pieces of at most ``most`` as possible, of near-equal size."""
    pieces = -(-total // most)
    return -(-total // pieces)


#: Attention weights per chunk of :func:`attention_chunks` (elements; 2 MB in float32).
ATTENTION_CHUNK_NUMEL = 2 ** 19


def attention_chunks(batch: int, windows: int, per_window: int,
                     budget: int = ATTENTION_CHUNK_NUMEL) -> List[Tuple[slice, slice]]:
    """Image and window slices that split a windowed attention into cache-sized pieces.

    Window attention in inference materialises ``batch * windows`` attention
    matrices; computed all at once they leave the caches between the
    products, the bias, the softmax and the second product. Computed a few
    images (or, for large images, a few windows of one image) at a time, each
    chunk's matrices stay in cache: ~1.2-1.6x faster window attention here
    (GC ViT, Twins SVT at 224, batch 8), and bit-identical, since every matrix
    sees the same operands and the same kernels.

    Args:
        batch: images.
        windows: windows per image.
        per_window: attention elements of one window (heads x queries x keys).
        budget: the most attention elements per chunk (at least one window).

    Returns:
        ``(images, windows)`` slice pairs covering ``batch x windows`` in order,
        one pair for everything when it fits into ``budget``.
    """
    per_image = windows * per_window
    if batch * per_image <= budget:
        return [(slice(None), slice(None))]
    if per_image <= budget:
        step = _even_step(batch, budget // per_image)
        return [(slice(i, i + step), slice(None)) for i in range(0, batch, step)]
    step = _even_step(windows, max(1, budget // per_window))
    return [(slice(i, i + 1), slice(w, w + step)) for i in range(batch) for w in range(0, windows, step)]


def image_by_image(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed one image of the batch at a time, the results concatenated.

    For full-resolution convolutional layers in inference: a batch's maps
    there outgrow the caches and are fresh memory on every call (allocations
    of tens of MB, which the C allocator returns to the OS when freed, so
    each is page-faulted in again), while one image's maps stay in cache
    between the convolution and the element-wise steps and are reused from
    the allocator's free memory. The function is the same; convolutions may
    sum in another order for a batch of one (float32 rounding).

    Args:
        fn: a batch-independent map of ``(B, ...)`` tensors.
        x: the batch.

    Returns:
        ``fn(x)`` (the memory format of ``fn``'s output is kept).
    """
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


#: Attention scores per chunk of :func:`bf16_attention` (elements; 2 MB in bfloat16).
BF16_ATTENTION_CHUNK_NUMEL = 2 ** 20


def is_cpu_bf16_inference(q: torch.Tensor) -> bool:
    """Whether ``q`` is a bfloat16 CPU tensor of inference (no autograd graph, nothing recorded)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu" and inference_inplace(q)


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   budget: int = BF16_ATTENTION_CHUNK_NUMEL) -> torch.Tensor:
    """Softmax attention for bfloat16 CPU inference, as two matmuls around a softmax over chunks of queries.

    Why not SDPA: on a CPU without AMX tiles (AVX512-BF16 only) SDPA's flash
    kernel runs no faster in bfloat16 than in float32, while oneDNN's bfloat16
    matmuls run 2-5x faster than float32 ones; for the spatial-reduction
    attention of PVT / Twins at detection size (tens of thousands of queries,
    about a thousand keys) this is ~1.6x faster than SDPA in bfloat16. The
    scores and probabilities are rounded to bfloat16 between the steps (the
    softmax itself computes in float32), as GPU flash attention rounds its
    probabilities: about 5e-3 from float32 attention for unit-variance inputs,
    against 2e-3 for SDPA in bfloat16. Queries are taken in chunks of about
    ``budget`` scores so that each chunk's scores stay in cache.

    Args:
        q: queries ``(B, heads, N, d)`` (any strides).
        k, v: keys and values ``(B, heads, M, d)``.
        scale: factor on the scores (applied to the keys once).
        budget: the most scores per chunk.

    Returns:
        ``(B, N, heads, d)`` attention output, contiguous (token-major, as the
        output projection reads it).
    """
    b, heads, n, d = q.shape
    keys_t = (k * scale).transpose(-2, -1).contiguous()  # once, not once per chunk inside matmul
    v = v.contiguous()
    out = q.new_empty(b, n, heads, d)
    out_heads = out.transpose(1, 2)  # (B, heads, N, d) view written chunk by chunk
    rows = max(1, budget // (b * heads * k.shape[-2]))
    for start in range(0, n, rows):
        scores = torch.matmul(q[:, :, start:start + rows], keys_t)
        out_heads[:, :, start:start + rows] = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out


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

