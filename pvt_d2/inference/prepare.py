"""Swapping the prepared modules in and out."""
from typing import Dict

from torch import nn

from .cache import clear_cache
from .kernels import PackedLinear
from .modules import SWAPS

__all__ = ["prepare_for_inference", "restore_from_inference", "is_prepared"]

_PLAIN: Dict[type, type] = {fast: plain for plain, fast in SWAPS.items()}
_PLAIN[PackedLinear] = nn.Linear


def _as_type(module: nn.Module, cls: type) -> nn.Module:
    """A module of type ``cls`` sharing every parameter, buffer, submodule and setting of ``module``."""
    new = cls.__new__(cls)
    vars(new).update(vars(module))
    return new


def _swap(module: nn.Module, convert) -> nn.Module:
    for name, child in list(module.named_children()):
        new = convert(module, name, child)
        if new is not child:
            setattr(module, name, new)
        _swap(new, convert)
    return module


def _prepare_one(parent, name, child):
    if type(child) is nn.Linear and name in getattr(parent, "packed_linears", ()):
        return _as_type(child, PackedLinear)
    fast = SWAPS.get(type(child))
    return child if fast is None else _as_type(child, fast)


def _restore_one(parent, name, child):
    plain = _PLAIN.get(type(child))
    if plain is None:
        return child
    clear_cache(child)
    return _as_type(child, plain)


def prepare_for_inference(model: nn.Module, fold_batchnorm_while_recording: bool = False) -> nn.Module:
    """Swap the inference kernels into ``model`` (in place; the root too, so use the return value).

    Args:
        model: any module containing pvt_d2 backbone modules (a backbone, an
            FPN, a detector).
        fold_batchnorm_while_recording: fold LeViT's fixed BatchNorms also
            while autograd records (training with frozen BatchNorm), in the
            graph; by default only where nothing is recorded.

    Returns:
        ``model`` (or, when the root module itself has a prepared form, that).
    """
    model = _prepare_one(None, "", model)
    _swap(model, _prepare_one)
    for m in model.modules():
        if hasattr(type(m), "fold_while_recording"):
            m.fold_while_recording = bool(fold_batchnorm_while_recording)
    return model


def restore_from_inference(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_for_inference`: the plain modules, the same parameters, no caches.

    Returns:
        ``model`` (or the plain form of its root).
    """
    model = _restore_one(None, "", model)
    _swap(model, _restore_one)
    for m in model.modules():
        vars(m).pop("fold_while_recording", None)
    return model


def is_prepared(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a prepared one."""
    return any(type(m) in _PLAIN for m in model.modules())
