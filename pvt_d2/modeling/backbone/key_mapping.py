"""How a family's ImageNet checkpoints are recognised, renamed and identified.

Each family file ends with its :class:`FamilyMapping` (timm's pattern: the
checkpoint filter lives beside the model) and registers it with
:func:`register_mapping`. A mapping knows, for each source layout:

* ``markers``: regular expressions that must each match some key for a state
  dict to be recognised as that family and layout;
* a converter that renames the keys to pvt_d2's, reshapes the few tensors
  whose layout differs, and drops what the backbone has no use for
  (classifier head, distillation head, the final classifier norm, the class
  token, persistent index buffers). A key it does not know passes through
  unchanged, so it shows up as *unexpected* when loading instead of
  disappearing silently;

and, for the family as a whole:

* ``hparams``: the variant's defining numbers (depths, widths, ...) read from
  the shapes of a pvt_d2 state dict, and ``hparams_of_kwargs`` the same
  numbers from a registry entry's constructor arguments (completed with the
  class defaults by :func:`resolved_kwargs`), so a checkpoint can be matched
  to a variant name and refused when it is another variant;
* ``new_prefixes``: backbone parameters that no ImageNet checkpoint has
  (expected missing), besides the optional output norms of every backbone
  (:func:`pvt_d2.checkpoint.convert.new_parameter_prefixes`).

Tables that depend on the pretraining image size (PVT v1 position
embeddings, GC ViT relative position tables, LeViT attention biases) are
kept at their ImageNet shape; the models resize them on the fly.

This module imports no family file, so every family can import it;
:mod:`pvt_d2.checkpoint` (detection, checked loading, conversion files) reads
the registered mappings through :func:`get_mapping` and :data:`MAPPINGS`.
"""
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "CLASSIFIER_KEY_PREFIXES",
    "as_tuple",
    "Converted",
    "FamilyMapping",
    "MAPPINGS",
    "StateDict",
    "apply_key_fn",
    "blocks_per_stage",
    "drop_classifier_keys",
    "dropping",
    "get_mapping",
    "hidden_ratio",
    "identity",
    "pyramid_hparams",
    "pyramid_hparams_of_kwargs",
    "regex_renamer",
    "register_mapping",
    "resolved_kwargs",
    "shape_at",
]

StateDict = Dict[str, torch.Tensor]
#: A converter's result: the renamed state dict and the source keys it dropped.
Converted = Tuple[StateDict, List[str]]
#: A classifier's top-level entries that a dense-prediction backbone has no use for.
CLASSIFIER_KEY_PREFIXES = ("norm.", "head.")


@dataclass(frozen=True)
class FamilyMapping:
    """How checkpoints of one family are recognised, converted and identified (see the module docstring)."""

    family: str
    display: str
    markers: Dict[str, Tuple[str, ...]]
    converters: Dict[str, Callable[[StateDict], Converted]]
    hparams: Callable[[StateDict], Dict[str, Any]]
    hparams_of_kwargs: Callable[[Dict[str, Any]], Dict[str, Any]]
    new_prefixes: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def layouts(self) -> Tuple[str, ...]:
        return tuple(self.converters)

    def detect_layout(self, keys: Sequence[str]) -> Optional[str]:
        """The first layout whose markers all match some key, or None."""
        for layout, patterns in self.markers.items():
            if all(any(re.search(p, k) for k in keys) for p in patterns):
                return layout
        return None

    def convert(self, state_dict: StateDict, layout: str) -> Converted:
        """``(pvt_d2 state dict, dropped keys)`` for a state dict in ``layout``."""
        if layout not in self.converters:
            raise KeyError(f"{self.display} has no '{layout}' layout; supported: {', '.join(self.layouts)}")
        return self.converters[layout](state_dict)


MAPPINGS: Dict[str, FamilyMapping] = {}


def register_mapping(mapping: FamilyMapping) -> FamilyMapping:
    """Make ``mapping`` known to checkpoint detection and loading; returns it."""
    if mapping.family in MAPPINGS:
        raise KeyError(f"checkpoint mapping of family '{mapping.family}' is registered twice")
    MAPPINGS[mapping.family] = mapping
    return mapping


def get_mapping(family: str) -> FamilyMapping:
    """The :class:`FamilyMapping` of ``family``; unknown names list the supported ones."""
    try:
        return MAPPINGS[family]
    except KeyError:
        raise KeyError(f"no checkpoint mapping for family '{family}'; supported: {', '.join(MAPPINGS)}") from None


# ---------------------------------------------------------------------------
# Building blocks of converters
# ---------------------------------------------------------------------------
KeyFn = Callable[[str, torch.Tensor], Optional[Tuple[str, torch.Tensor]]]


def apply_key_fn(state_dict: StateDict, key_fn: KeyFn) -> Converted:
    """Map every entry through ``key_fn`` (None = drop); two sources for one target is an error."""
    out: StateDict = {}
    dropped: List[str] = []
    for key, value in state_dict.items():
        mapped = key_fn(key, value)
        if mapped is None:
            dropped.append(key)
            continue
        new_key, new_value = mapped
        if new_key in out:
            raise ValueError(f"checkpoint keys map twice to '{new_key}' (second source: '{key}')")
        out[new_key] = new_value
    return out, dropped


def dropping(*prefixes: str) -> Callable[[StateDict], Converted]:
    """A converter that keeps every key unchanged except those starting with ``prefixes``."""

    def convert(state_dict: StateDict) -> Converted:
        return apply_key_fn(state_dict, lambda k, v: None if k.startswith(prefixes) else (k, v))

    return convert


def regex_renamer(rules: Sequence[Tuple[str, Callable[[re.Match], str]]],
                  drop: Tuple[str, ...] = ()) -> Callable[[StateDict], Converted]:
    """A converter from renaming rules: the first ``(pattern, new_name)`` whose pattern fully matches a key renames it.

    Args:
        rules: regular expressions and functions of their match giving the new name.
        drop: keys equal to or starting with one of these are dropped.
    """

    def key_fn(k, v):
        if k in drop or k.startswith(drop):
            return None
        for pattern, new_name in rules:
            m = re.fullmatch(pattern, k)
            if m:
                return new_name(m), v
        return k, v

    def convert(state_dict: StateDict) -> Converted:
        return apply_key_fn(state_dict, key_fn)

    return convert


def identity(state_dict: StateDict) -> Converted:
    """The converter of a layout that is already pvt_d2's."""
    return dict(state_dict), []


def drop_classifier_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """The state dict without its top-level classifier entries (:data:`CLASSIFIER_KEY_PREFIXES`)."""
    return dropping(*CLASSIFIER_KEY_PREFIXES)(dict(state_dict))[0]


# ---------------------------------------------------------------------------
# Reading variant numbers
# ---------------------------------------------------------------------------
def blocks_per_stage(state_dict: StateDict, pattern: str) -> Tuple[int, ...]:
    """Blocks per stage counted from keys matching ``pattern`` (groups: stage, block)."""
    counts: Dict[int, int] = {}
    for key in state_dict:
        m = re.fullmatch(pattern, key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            counts[stage] = max(counts.get(stage, 0), block + 1)
    return tuple(counts.get(i, 0) for i in range(max(counts) + 1)) if counts else ()


def shape_at(state_dict: StateDict, key: str, axis: int = 0) -> Optional[int]:
    """``state_dict[key].shape[axis]``, or None when the entry or the axis is absent."""
    value = state_dict.get(key)
    return None if value is None or value.dim() <= axis else int(value.shape[axis])


def hidden_ratio(state_dict: StateDict, key: str, dim: Optional[int]) -> Optional[float]:
    """Output width of ``key`` divided by ``dim`` (an MLP's expansion), or None."""
    hidden = shape_at(state_dict, key)
    return None if hidden is None or not dim else hidden / dim


def pyramid_hparams(state_dict: StateDict, block_key: str, dim_key: str, fc1_key: str) -> Dict[str, Any]:
    """Depths, widths and MLP ratios of a four-stage pyramid of transformer blocks.

    Args:
        state_dict: a pvt_d2 state dict.
        block_key: regular expression of one key per block (groups: stage, block).
        dim_key: format string (``{i}`` = stage) of a 1-d entry whose length is the stage width.
        fc1_key: format string of the first MLP linear of the stage's first block.
    """
    depths = blocks_per_stage(state_dict, block_key)
    dims = tuple(shape_at(state_dict, dim_key.format(i=i)) for i in range(len(depths)))
    ratios = tuple(hidden_ratio(state_dict, fc1_key.format(i=i), d) for i, d in enumerate(dims))
    return {"depths": depths, "embed_dims": dims, "mlp_ratios": ratios}


def pyramid_hparams_of_kwargs(kw: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of :func:`pyramid_hparams` from constructor arguments."""
    return {"depths": as_tuple(kw["depths"]), "embed_dims": as_tuple(kw["embed_dims"]),
            "mlp_ratios": tuple(float(r) for r in kw["mlp_ratios"])}


def as_tuple(values) -> Optional[Tuple]:
    return tuple(values) if values is not None else None


def resolved_kwargs(model_cls: type, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A registry entry's constructor arguments with the class defaults filled in.

    The constructor stays the one owner of every default; this reads them
    instead of restating them.
    """
    params = inspect.signature(model_cls.__init__).parameters
    out = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    out.update(kwargs)
    return out
