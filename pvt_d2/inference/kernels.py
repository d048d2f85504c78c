"""CPU inference kernels: packed oneDNN linears, chunked and bfloat16 attention, in-place steps.

Every kernel here computes the function of the plain model; the ones that
change float32 rounding say so. They run only where autograd records nothing
and no graph is being recorded (:func:`inference_inplace`); elsewhere the
prepared modules call the plain model's code.
"""
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.backbone.export_ops import is_tracing
from .cache import CacheOwner, cached

__all__ = [
    "FUSED_ACTIVATIONS",
    "inference_inplace",
    "residual_add",
    "packed_linear",
    "PackedLinear",
    "linear_act",
    "even_step",
    "attention_chunks",
    "image_by_image",
    "is_cpu_bf16_inference",
    "bf16_attention",
]

#: Activations :func:`packed_linear` applies inside the GEMM: name -> (function, oneDNN post-op, its algorithm).
FUSED_ACTIVATIONS = {"gelu": (F.gelu, "gelu", "none"), "hardswish": (F.hardswish, "hardswish", "")}


def inference_inplace(x: torch.Tensor) -> bool:
    """Whether ``x`` may be overwritten by an in-place op: no autograd graph needs it and nothing is recorded."""
    return not (torch.is_grad_enabled() and x.requires_grad) and not is_tracing()


def residual_add(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``x + branch``, accumulated into the freshly computed ``branch`` in inference (no new allocation)."""
    if inference_inplace(branch) and branch.shape == x.shape:
        return branch.add_(x)
    return x + branch


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype :func:`packed_linear` computes in (float32, or bfloat16 under CPU autocast), or None."""
    if weight.dtype != torch.float32 or not onednn_linear_available():
        return None
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32 if x.dtype == torch.float32 else None
    # CPU autocast: what F.linear would compute in, where oneDNN has bfloat16 kernels
    if (torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return torch.bfloat16
    return None


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], owner: nn.Module,
                  activation: Optional[str] = None) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))``, through a oneDNN-packed copy of ``weight`` where it applies.

    ``nn.Linear`` on the CPU calls MKL's ``sgemm`` (``addmm``), which repacks
    the weight into its blocked layout on every call; here the weight is
    packed once (``torch.ops.mkldnn._reorder_linear_weight``, kept in the
    :func:`~.cache.cached` slot of ``owner``) and oneDNN's packed GEMM runs
    (``torch.ops.mkldnn._linear_pointwise``, the prepacked linear of
    ``torch.compile``'s CPU backend). Per-row results do not depend on the
    row count; they equal ``addmm``'s up to 128 input channels and differ by
    float rounding (~1e-6 relative) above. Float32 CPU inputs, and under CPU
    autocast to bfloat16 float32 / bfloat16 inputs (from a bfloat16 copy of
    the weight packed once). ``activation`` is None or a key of
    :data:`FUSED_ACTIVATIONS`, applied by the GEMM to its output tile.
    Anything else (autograd recording, other dtypes and devices,
    non-contiguous inputs, recording a graph) runs ``F.linear``.
    """
    dtype = None  # is_tracing first: while recording, no size test may enter the graph
    if (not is_tracing() and x.device.type == "cpu" and x.dim() >= 2 and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) and x.is_contiguous()):
        dtype = _packed_dtype(x, weight)
    if dtype is None:
        y = F.linear(x, weight, bias)
        return y if activation is None else FUSED_ACTIVATIONS[activation][0](y)

    def pack():
        return (torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype)),
                None if bias is None else bias.detach().to(dtype))

    packed, packed_bias = cached(owner, "packed_linear", dtype, pack, (weight, bias), size=2)
    attr, algorithm = ("none", "") if activation is None else FUSED_ACTIVATIONS[activation][1:]
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, packed_bias, attr, [], algorithm)


class PackedLinear(CacheOwner, nn.Linear):
    """``nn.Linear`` running :func:`packed_linear`; :meth:`forward_act` also applies a following activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias, self)

    def forward_act(self, x: torch.Tensor, activation: Optional[str] = None) -> torch.Tensor:
        """``activation(self(x))``; ``activation`` is None or a key of :data:`FUSED_ACTIVATIONS`."""
        return packed_linear(x, self.weight, self.bias, self, activation)


def linear_act(linear: nn.Linear, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation(linear(x))``, applied inside the GEMM when ``linear`` is a :class:`PackedLinear`."""
    if isinstance(linear, PackedLinear):
        return linear.forward_act(x, activation)
    return FUSED_ACTIVATIONS[activation][0](linear(x))


def even_step(total: int, most: int) -> int:
    """The step that splits ``total`` into as few pieces of at most ``most`` as possible, of near-equal size."""
    pieces = -(-total // most)
    return -(-total // pieces)


#: Attention weights per chunk of :func:`attention_chunks` (elements; 2 MB in float32).
ATTENTION_CHUNK_NUMEL = 2 ** 19


def attention_chunks(batch: int, windows: int, per_window: int,
                     budget: int = ATTENTION_CHUNK_NUMEL) -> List[Tuple[slice, slice]]:
    """Image and window slices that split a windowed attention into cache-sized pieces.

    Computed a few images (or, for large images, a few windows of one image)
    at a time, each chunk's attention matrices stay in cache between the
    products, the bias, the softmax and the second product; bit-identical,
    since every matrix sees the same operands and kernels.

    Args:
        batch: images.
        windows: windows per image.
        per_window: attention elements of one window (heads x queries x keys).
        budget: the most attention elements per chunk (at least one window).

    Returns:
        ``(images, windows)`` slice pairs covering ``batch x windows`` in order.
    """
    per_image = windows * per_window
    if batch * per_image <= budget:
        return [(slice(None), slice(None))]
    if per_image <= budget:
        step = even_step(batch, budget // per_image)
        return [(slice(i, i + step), slice(None)) for i in range(0, batch, step)]
    step = even_step(windows, max(1, budget // per_window))
    return [(slice(i, i + 1), slice(w, w + step)) for i in range(batch) for w in range(0, windows, step)]


def image_by_image(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` computed one image of the batch at a time, the results concatenated.

    For full-resolution convolutional layers: one image's maps stay in cache
    between the convolution and the element-wise steps and are reused from
    the allocator's free memory, where a batch's maps would be fresh pages on
    every call. Convolutions may sum in another order for a batch of one.
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

    On a CPU without AMX tiles SDPA's flash kernel runs no faster in bfloat16
    than in float32, while oneDNN's bfloat16 matmuls do. The scores and
    probabilities are rounded to bfloat16 between the steps (the softmax
    computes in float32), as GPU flash attention rounds its probabilities.
    Queries are taken in chunks of about ``budget`` scores.

    Args:
        q: queries ``(B, heads, N, d)`` (any strides).
        k, v: keys and values ``(B, heads, M, d)``.
        scale: factor on the scores (applied to the keys once).
        budget: the most scores per chunk.

    Returns:
        ``(B, N, heads, d)``, contiguous (token-major, as the output projection reads it).
    """
    b, heads, n, d = q.shape
    keys_t = (k * scale).transpose(-2, -1).contiguous()  # once, not once per chunk inside matmul
    v = v.contiguous()
    out = q.new_empty(b, n, heads, d)
    out_heads = out.transpose(1, 2)  # (B, heads, N, d) view written chunk by chunk
    rows = max(1, budget // (b * heads * k.shape[-2]))
    for start in range(0, n, rows):  # unnamed scores: each chunk's reuse the memory of the last one's
        out_heads[:, :, start:start + rows] = torch.matmul(
            torch.softmax(torch.matmul(q[:, :, start:start + rows], keys_t), dim=-1), v)
    return out
