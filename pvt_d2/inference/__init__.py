"""The CPU inference engine: prepared modules swapped into a plain model, and back.

:func:`prepare_for_inference` replaces every model module that has a faster
inference form (:data:`~.modules.SWAPS`) by it, as ``torch.ao``'s fusion and
``timm.utils.reparameterize_model`` swap modules from outside the model:
packed oneDNN linears with fused activations, chunked MLPs and window
attention, in-place residual sums, LeViT's BatchNorm folding, GC ViT's
image-by-image stem, bias and mask caches (:mod:`.cache`), bfloat16 CPU
attention and channels-last conv inputs. Parameters, buffers and the state
dict are shared and unchanged; :func:`restore_from_inference` swaps the plain
modules back. ``create_backbone(..., fast_inference=True)`` (the default) and
``MODEL.PVT_D2.FAST_INFERENCE`` call :func:`prepare_for_inference`.

Prepared modules run the plain code wherever autograd records or a graph is
recorded (training, export), so a prepared model trains and exports like the
plain one; in inference the kernels that change float32 rounding (packed
GEMMs above 128 channels, folding, channels-last convs) differ from it by
rounding only.
"""
from .prepare import is_prepared, prepare_for_inference, restore_from_inference

__all__ = ["prepare_for_inference", "restore_from_inference", "is_prepared"]
