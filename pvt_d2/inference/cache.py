"""The one cache of the inference engine: values derived from tensors, per module.

A prepared module keeps what it derives from its parameters (a packed
weight, a folded BatchNorm, a gathered attention bias, a padding mask) in
:func:`cached`. An entry is found again while its source tensors are the same
objects on the same storage at the same version counter (loading weights or
an optimizer step bumps it; ``module.to`` swaps the storage), so it follows
the weights without being told. The entries are no parameters or buffers
(never in a state dict) and :class:`CacheOwner` leaves them out of pickles
and copies.
"""
from collections import OrderedDict
from typing import Callable, Hashable, Optional, Sequence

import torch
from torch import nn

__all__ = ["CacheOwner", "cached", "cache_slot", "clear_cache"]

_ATTR = "_inference_cache"


class CacheOwner:
    """Base of the modules that call :func:`cached`: pickles and deep copies leave the entries behind.

    (oneDNN-packed tensors can be neither pickled nor deep-copied.)
    """

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop(_ATTR, None)
        return state


def cache_slot(owner: nn.Module, slot: str, create: bool = True) -> "OrderedDict":
    """The entries of ``owner``'s ``slot``: ``(key, source stamps) -> (sources, value)``, oldest first.

    With ``create=False`` a missing slot reads as empty and is not made.
    """
    slots = owner.__dict__.get(_ATTR)
    if not create:
        return OrderedDict() if slots is None else slots.get(slot, OrderedDict())
    if slots is None:
        slots = owner.__dict__[_ATTR] = {}
    entries = slots.get(slot)
    if entries is None:
        entries = slots[slot] = OrderedDict()
    return entries


def cached(owner: nn.Module, slot: str, key: Hashable, compute: Callable[[], object],
           sources: Sequence[Optional[torch.Tensor]] = (), size: int = 1, max_numel: Optional[int] = None):
    """``compute()``, kept per ``owner``, ``slot`` and ``key`` while the ``sources`` are unchanged.

    Args:
        owner: the module the value belongs to (a :class:`CacheOwner`).
        slot: what the value is (one small LRU per owner and slot).
        key: what else the value depends on (sizes, dtype, device).
        compute: builds the value; called on a miss. Callers call this only
            where autograd records nothing, so values hold no graph.
        sources: tensors the value is derived from (None entries allowed).
        size: entries kept in the slot (least recently used dropped first).
        max_numel: a tensor value with more elements is returned, not kept.

    Returns:
        The cached or freshly computed value.
    """
    entries = cache_slot(owner, slot)
    full_key = (key, tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in sources))
    hit = entries.get(full_key)
    if hit is not None:
        entries.move_to_end(full_key)
        return hit[1]
    value = compute()
    if max_numel is None or not isinstance(value, torch.Tensor) or value.numel() <= max_numel:
        entries[full_key] = (tuple(sources), value)  # holding the sources keeps their id() unique
        while len(entries) > size:
            entries.popitem(last=False)
    return value


def clear_cache(owner: nn.Module) -> None:
    """Drop every value kept for ``owner``."""
    owner.__dict__.pop(_ATTR, None)
