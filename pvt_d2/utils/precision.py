"""Mixed-precision inference: ``--amp fp32|fp16|bf16`` of the tools.

The backbone (the pvt_d2 trunk and its FPN) runs under :func:`torch.autocast`
in the requested precision and hands float32 maps to the rest of the
detector, so the RPN, the ROI heads and detectron2's post-processing (box
decoding, NMS, mask pasting) compute in float32 and the returned boxes,
scores and masks are float32, as without AMP.

Hardware. On the CPU, bfloat16 is used only where the CPU computes it natively
(AVX512-BF16 or AMX; :func:`cpu_supports_bf16`): elsewhere autocast would
emulate it, slower than float32, so the request falls back to float32 with a
warning that says why. float16 autocast on the CPU is likewise accepted only
with AMX-FP16. On CUDA, bfloat16 needs a GPU that supports it
(``torch.cuda.is_bf16_supported``); float16 always works.
"""
import logging
from typing import Dict, Optional, Tuple

import torch
from detectron2.modeling import Backbone
from torch import nn

__all__ = [
    "AMP_CHOICES",
    "AutocastBackbone",
    "cpu_supports_bf16",
    "cpu_supports_fp16",
    "resolve_amp",
    "autocast_backbone",
]

logger = logging.getLogger(__name__)

#: Values of the tools' ``--amp``; ``auto`` (a bare ``--amp``) is float16 on CUDA, bfloat16 on the CPU.
AMP_CHOICES = ("fp32", "fp16", "bf16", "auto")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def cpu_supports_fp16() -> bool:
    """Whether this CPU computes float16 matmuls natively (AMX-FP16)."""
    return bool(getattr(getattr(torch, "cpu", None), "_is_amx_fp16_supported", lambda: False)())


def resolve_amp(amp: str, device) -> Tuple[Optional[torch.dtype], str]:
    """The autocast dtype for ``--amp amp`` on ``device``, falling back to float32 where unsupported.

    Args:
        amp: one of :data:`AMP_CHOICES`.
        device: the device the model runs on.

    Returns:
        ``(dtype, note)``: ``dtype`` is None for float32; ``note`` is a
        one-line explanation when the request fell back to float32, else "".

    Raises:
        ValueError: ``amp`` is not one of :data:`AMP_CHOICES`.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got '{amp}'")
    device_type = torch.device(device).type
    if amp == "auto":
        amp = "fp16" if device_type == "cuda" else "bf16"
    if amp == "fp32":
        return None, ""
    if device_type == "cuda":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            return None, "--amp bf16: this GPU does not support bfloat16; running in float32"
        return _DTYPES[amp], ""
    if amp == "bf16" and not cpu_supports_bf16():
        return None, ("--amp bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), where autocast would be "
                      "slower than float32; running in float32")
    if amp == "fp16" and not cpu_supports_fp16():
        return None, ("--amp fp16: this CPU has no native float16 matmuls (AMX-FP16); running in float32 "
                      "(use --amp bf16 on the CPU)")
    return _DTYPES[amp], ""


class AutocastBackbone(Backbone):
    """A detectron2 backbone run under autocast, returning float32 feature maps.

    Wraps an already loaded backbone for inference; forwards ``output_shape``,
    ``size_divisibility`` and ``padding_constraints`` to it. The wrapped
    module is ``self.backbone``, so the state-dict keys gain a
    ``backbone.`` level: load weights before wrapping.

    Args:
        backbone: the detector's backbone (e.g. the FPN).
        dtype: autocast dtype (``torch.bfloat16`` or ``torch.float16``).
    """

    def __init__(self, backbone: Backbone, dtype: torch.dtype):
        super().__init__()
        self.backbone = backbone
        self.dtype = dtype

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.backbone.padding_constraints

    def output_shape(self):
        return self.backbone.output_shape()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            out = self.backbone(x)
        return {k: v.float() for k, v in out.items()}


def autocast_backbone(model: nn.Module, amp: str) -> Optional[torch.dtype]:
    """Run ``model.backbone`` (a detectron2 meta-architecture's) under ``--amp amp``, in place.

    Logs a warning when the request falls back to float32 (see
    :func:`resolve_amp`). Call it after loading the weights.

    Returns:
        The autocast dtype, or None when the model stays in float32.
    """
    dtype, note = resolve_amp(amp, next(model.parameters()).device)
    if note:
        logger.warning(note)
    if dtype is not None and not isinstance(model.backbone, AutocastBackbone):
        model.backbone = AutocastBackbone(model.backbone, dtype)
    return dtype
