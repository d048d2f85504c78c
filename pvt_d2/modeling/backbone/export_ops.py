"""Tensor ops whose shapes stay symbolic while a model is recorded.

While :func:`torch.jit.trace`, :func:`torch.export.export` or ``torch.compile``
records a model (:func:`is_tracing`), a Python branch on a size is baked into
the graph at the example size. The ops here take the general path while
recording instead: zero-width pads, same-size resizes and explicit copies are
exact no-ops, and the recorded graph then follows any input size. In eager
mode they skip those no-ops. Model code calls them; it never asks whether it
is being recorded.

Layout. Token sequences ``(B, H*W, C)`` and feature maps ``(B, C, H, W)`` are
two views of the same memory when the map is channels-last:
:func:`tokens_to_map` returns such a view and :func:`map_to_tokens` turns a
channels-last map back into contiguous tokens, both without copying.
"""
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "is_tracing",
    "to_contiguous",
    "contiguous_nchw",
    "pad_to_multiple",
    "pad_to_at_least",
    "pad_axis_to_multiple",
    "crop_axis",
    "crop_to",
    "tokens_to_map",
    "map_to_tokens",
    "window_partition",
    "window_unpartition",
    "resize_to",
    "max_pool2x2_ceil",
]


def is_tracing() -> bool:
    """True while :func:`torch.jit.trace`, :func:`torch.export.export` or ``torch.compile`` records the model."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def to_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``; while :func:`torch.export.export` records the model, always a copy.

    ``contiguous()`` asks whether ``x`` already is, which for a permuted map
    depends on whether a side is 1: under export that question becomes a
    guard on the input size. A copy has the same values and shape.
    """
    if torch.compiler.is_compiling():
        return x.clone(memory_format=torch.contiguous_format)
    return x.contiguous()


def contiguous_nchw(x: torch.Tensor) -> torch.Tensor:
    """A contiguous ``(B, C, H, W)`` map with the values of ``x`` (``x`` itself when it already is).

    A channels-last map (the view :func:`tokens_to_map` returns) is copied
    image by image as 2-d ``(H*W, C) -> (C, H*W)`` transposes, which ATen
    copies in cache-sized blocks, faster than ``x.contiguous()``'s
    element-wise permuted copy; same values. While recording: :func:`to_contiguous`.
    """
    if (is_tracing() or x.dim() != 4 or x.is_contiguous()
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return to_contiguous(x)
    b, c, h, w = x.shape
    out = x.new_empty(b, c, h * w)
    for i in range(b):
        out[i].copy_(x[i].reshape(c, h * w))  # a transposed view of the image's (H*W, C) tokens
    return out.view(b, c, h, w)


def _pad_hw(x: torch.Tensor, pad_h, pad_w, channels_last: bool, value: float = 0.0) -> torch.Tensor:
    """Pad the bottom/right; skipped in eager mode when nothing is to pad."""
    if is_tracing() or pad_h or pad_w:
        pad = (0, 0, 0, pad_w, 0, pad_h) if channels_last else (0, pad_w, 0, pad_h)
        x = F.pad(x, pad, value=value)
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int,
                    channels_last: bool = False) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Zero-pad the bottom/right of a map so both sides divide ``multiple``.

    Args:
        x: ``(B, C, H, W)``, or ``(B, H, W, C)`` when ``channels_last``.
        multiple: the required divisor of height and width.
        channels_last: layout of ``x``.

    Returns:
        The padded tensor and the padded rows and columns ``(pad_h, pad_w)``.
    """
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[-2], x.shape[-1])
    # ceil(h / m) * m - h as a floor division of non-negative sizes: export's symbolic sizes
    # simplify it, and ONNX's integer Div (which truncates) computes it right.
    pad_h = (h + multiple - 1) // multiple * multiple - h
    pad_w = (w + multiple - 1) // multiple * multiple - w
    return _pad_hw(x, pad_h, pad_w, channels_last), (pad_h, pad_w)


def _clamp_min_zero(v):
    """``max(v, 0)`` for a Python int, a ``SymInt`` (export) or a traced size (``jit.trace``, a 0-d tensor)."""
    if isinstance(v, torch.Tensor):
        return v.clamp(min=0)
    return torch.sym_max(v, 0)


def pad_to_at_least(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the bottom/right of a ``(B, C, H, W)`` map whose sides are shorter than ``size``.

    Under :func:`torch.export.export` the program instead asserts at run time
    that both sides are at least ``size``.
    """
    h, w = x.shape[-2], x.shape[-1]
    if torch.compiler.is_compiling():
        torch._check(h >= size)
        torch._check(w >= size)
        return x
    return _pad_hw(x, _clamp_min_zero(size - h), _clamp_min_zero(size - w), channels_last=False)


def pad_axis_to_multiple(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad the end of axis ``dim`` (non-negative) of ``x`` to a multiple of ``multiple``."""
    n = x.shape[dim]
    pad = (n + multiple - 1) // multiple * multiple - n
    if is_tracing() or pad:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])
    return x


def crop_axis(x: torch.Tensor, dim: int, size) -> torch.Tensor:
    """The first ``size`` entries of axis ``dim`` of ``x``.

    A slice (a view), also in a :func:`torch.jit.trace`. While
    :func:`torch.export.export` records the model, an ``index_select``: its
    output size is the index length, which export follows without having to
    prove ``size <= ceil(size / m) * m``.
    """
    if torch.compiler.is_compiling():
        return x.index_select(dim, torch.arange(size, device=x.device))
    return x[(slice(None),) * dim + (slice(None, size),)]


def crop_to(x: torch.Tensor, hw: Tuple[int, int], channels_last: bool = False) -> torch.Tensor:
    """The top-left ``hw`` of a map padded by :func:`pad_to_multiple` (``(B, C, H, W)`` or channels-last)."""
    hdim = 1 if channels_last else 2
    return crop_axis(crop_axis(x, hdim, hw[0]), hdim + 1, hw[1])


def tokens_to_map(x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """``(B, H*W, C)`` tokens to a ``(B, C, H, W)`` map (for contiguous tokens a channels-last view, no copy)."""
    b, _, c = x.shape
    return x.reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` map to ``(B, H*W, C)`` tokens (without a copy for a channels-last map).

    While :func:`torch.export.export` records the model, an explicit copy:
    whether ``flatten`` can be a view depends on whether a side is 1.
    """
    if torch.compiler.is_compiling():
        b, c, h, w = x.shape
        return to_contiguous(x.permute(0, 2, 3, 1)).view(b, h * w, c)
    return x.flatten(2).transpose(1, 2)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Zero-pad a channels-last map to a multiple of the window and split it into windows.

    Args:
        x: ``(B, H, W, C)`` of any size.
        window_size: side ``s`` of a window.

    Returns:
        ``(B, num_windows, s * s, C)``, windows in row-major order.
    """
    b, h, w, c = x.shape
    s = window_size
    # window counts spelled out (no -1) and an explicit copy: export follows any window count
    nh, nw = (h + s - 1) // s, (w + s - 1) // s
    x = _pad_hw(x, nh * s - h, nw * s - w, channels_last=True)
    x = to_contiguous(x.view(b, nh, s, nw, s, c).permute(0, 1, 3, 2, 4, 5))
    return x.view(b, nh * nw, s * s, c)


def window_unpartition(windows: torch.Tensor, window_size: int, hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, num_windows, s * s, C)`` to ``(B, H, W, C)``, padding cropped."""
    h, w = hw
    s = window_size
    nh, nw = (h + s - 1) // s, (w + s - 1) // s
    b, c = windows.shape[0], windows.shape[-1]
    x = to_contiguous(windows.reshape(b, nh, nw, s, s, c).permute(0, 1, 3, 2, 4, 5))
    return crop_to(x.view(b, nh * s, nw * s, c), hw, channels_last=True)


def resize_to(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """``F.interpolate(x, size, mode)`` of a ``(B, C, H, W)`` map; ``x`` itself when it already has that size."""
    if is_tracing() or tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False)
    return x


def max_pool2x2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2x2 stride-2 max pooling in ceil mode (``ceil(n / 2)`` per side) of a ``(B, C, H, W)`` map.

    While recording: odd sides padded with ``-inf`` (never a maximum) and
    floor mode, the same maxima with shapes export follows.
    """
    if is_tracing():
        x = F.pad(x, (0, x.shape[-1] % 2, 0, x.shape[-2] % 2), value=float("-inf"))
        return F.max_pool2d(x, kernel_size=2, stride=2)
    return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
