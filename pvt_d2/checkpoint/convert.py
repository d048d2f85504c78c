"""From an ImageNet checkpoint file to a loaded pvt_d2 backbone, with nothing left to chance.

The pipeline:

1. :func:`~.io.read_state_dict` reads the file safely (no pickle code runs)
   and unwraps nested ``model`` / ``state_dict`` / ``model_ema`` entries.
2. :func:`detect_source` recognises family and layout (official or timm)
   from marker keys (each family file's ``CHECKPOINT_MAPPING``); ``family=`` / ``layout=`` override it.
3. :func:`convert_state_dict` renames the keys to pvt_d2's and identifies the
   variant from the shapes (depths, widths, heads), giving a
   :class:`ConvertedCheckpoint`.
4. :func:`load_converted` checks it against the backbone: a checkpoint of
   another family or variant is refused naming both; every backbone key must
   be loaded except the modules the backbone adds on top of the classifier
   (the family mapping's ``new_prefixes`` and the optional ``output_norms``);
   an unexpected key or a shape mismatch is an error. A
   table of loaded / new / dropped / missing / unexpected / mismatched keys
   is logged on the ``pvt_d2`` logger, and raised with the error.

:func:`load_pretrained_backbone` runs all of it for ``MODEL.PVT_D2.PRETRAINED``
and :func:`save_for_detectron2` writes a file that detectron2's
``MODEL.WEIGHTS`` accepts (``tools/convert_pretrained.py``).
"""
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from tabulate import tabulate
from torch import nn

from ..modeling.backbone.base import PyramidBackbone
from ..modeling.backbone.gcvit import FIRST_GENERATION_QUERIES_KEY
from ..modeling.backbone.key_mapping import MAPPINGS, FamilyMapping, get_mapping, resolved_kwargs
from ..modeling.backbone.registry import ArchSpec, get_arch, list_architectures
from .download import is_url, resolve_pretrained
from .io import CheckpointError, atomic_torch_save, read_state_dict

__all__ = [
    "ConvertedCheckpoint",
    "LoadReport",
    "detect_source",
    "convert_state_dict",
    "convert_checkpoint",
    "arch_hparams",
    "match_arch",
    "bottom_up_backbone",
    "find_backbone",
    "describe_backbone",
    "load_converted",
    "load_pretrained_backbone",
    "new_parameter_prefixes",
    "save_for_detectron2",
]

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
#: Optional LayerNorms on the outputs (``OUTPUT_NORM``): never part of an ImageNet classifier.
ALWAYS_NEW_PREFIXES = ("output_norms.",)
#: State-dict entries that are no weights but a mode the weights need (GC ViT first-generation queries).
_LAYOUT_FLAGS = (FIRST_GENERATION_QUERIES_KEY,)


@dataclass
class ConvertedCheckpoint:
    """A checkpoint renamed to pvt_d2's keys, with what was recognised about it.

    Attributes:
        state_dict: backbone weights under pvt_d2 names.
        family: model family (``"pvt_v2"``, ...).
        layout: source layout (``"official"``, ``"timm"`` or ``"pvt_d2"``).
        arch: the registered variant whose shapes it has, or None.
        hparams: the variant-defining numbers read from its shapes.
        dropped: source keys left out (classifier head, index buffers, ...).
        source: file name (or a description) for messages.
    """

    state_dict: StateDict
    family: str
    layout: str
    arch: Optional[str]
    hparams: Dict[str, Any]
    dropped: List[str] = field(default_factory=list)
    source: str = "<state dict>"

    @property
    def label(self) -> str:
        """``"pvt_v2_b2"``, or the family and numbers of an unregistered variant."""
        return self.arch or f"an unregistered {self.family} variant ({_format_hparams(self.hparams)})"


@dataclass
class LoadReport:
    """What a load did, key by key. Any ``missing``, ``unexpected`` or ``mismatched`` entry is an error."""

    source: str
    model: str
    family: str
    layout: str
    loaded: List[str]
    new: List[str]
    dropped: List[str]
    missing: List[str]
    unexpected: List[str]
    mismatched: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def table(self) -> str:
        """The report as a table (status, number of keys, which)."""
        rows = [
            ("loaded", len(self.loaded), _summarize(self.loaded)),
            ("new in the backbone (kept at init)", len(self.new), _summarize(self.new)),
            ("dropped from the checkpoint", len(self.dropped), _summarize(self.dropped)),
            ("MISSING", len(self.missing), _summarize(self.missing, limit=20)),
            ("UNEXPECTED", len(self.unexpected), _summarize(self.unexpected, limit=20)),
            ("SHAPE MISMATCH", len(self.mismatched), _summarize([k for k, _, _ in self.mismatched], limit=20)),
        ]
        return tabulate(rows, headers=["keys", "count", "which"], tablefmt="pipe")

    def problems(self, limit: int = 40) -> str:
        """Every missing, unexpected and mismatched key, one per line (at most ``limit`` of each)."""
        lines = []
        for title, items in (("missing from the checkpoint", self.missing),
                             ("unexpected in the checkpoint", self.unexpected),
                             ("shape mismatch", [f"{k}: checkpoint {a} vs model {b}" for k, a, b in self.mismatched])):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {item}" for item in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


def _summarize(keys: Sequence[str], limit: int = 8) -> str:
    """Keys grouped by their first two name components, with counts (``stages.0.* (52)``)."""
    if not keys:
        return ""
    groups: "OrderedDict[str, int]" = OrderedDict()
    for k in keys:
        parts = k.split(".")
        group = ".".join(parts[:2]) + (".*" if len(parts) > 2 else "")
        groups[group] = groups.get(group, 0) + 1
    items = [g if n == 1 else f"{g} ({n})" for g, n in groups.items()]
    if len(items) > limit:
        items = items[:limit] + [f"... {len(items) - limit} more groups"]
    return ", ".join(items)


def _format_hparams(hp: Dict[str, Any], names: Optional[Sequence[str]] = None) -> str:
    def fmt(v):
        if isinstance(v, tuple):
            return "(" + ", ".join(fmt(x) for x in v) + ")"
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    return ", ".join(f"{k}={fmt(hp[k])}" for k in (names or hp))


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------
def _family_specs(family: str) -> List[ArchSpec]:
    return [get_arch(n) for n in list_architectures(family)]


def arch_hparams(arch: Union[str, ArchSpec]) -> Dict[str, Any]:
    """The variant-defining numbers of a registered architecture (see :mod:`pvt_d2.modeling.backbone.key_mapping`)."""
    spec = get_arch(arch) if isinstance(arch, str) else arch
    return get_mapping(spec.family).hparams_of_kwargs(resolved_kwargs(spec.model_cls, spec.kwargs))


def _hp_equal(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, tuple) and isinstance(y, tuple):
            if len(x) != len(y) or any(not _scalar_equal(p, q) for p, q in zip(x, y)):
                return False
        elif not _scalar_equal(x, y):
            return False
    return True


def _scalar_equal(x, y) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        return x is not None and y is not None and abs(float(x) - float(y)) < 1e-6
    return x == y


def match_arch(family: str, hparams: Dict[str, Any]) -> Optional[str]:
    """The registered variant of ``family`` with these numbers, or None."""
    for spec in _family_specs(family):
        if _hp_equal(arch_hparams(spec), hparams):
            return spec.name
    return None


# ---------------------------------------------------------------------------
# Detection and conversion
# ---------------------------------------------------------------------------
def detect_source(state_dict: StateDict) -> List[Tuple[str, str]]:
    """Every ``(family, layout)`` whose marker keys the state dict has (normally exactly one)."""
    keys = list(state_dict)
    found = []
    for mapping in MAPPINGS.values():
        layout = mapping.detect_layout(keys)
        if layout is not None:
            found.append((mapping.family, layout))
    return found


def _unknown_source_message(state_dict: StateDict, source: str) -> str:
    first = ", ".join(list(state_dict)[:8])
    return (f"{source} does not look like a supported ImageNet checkpoint (PVT v1/v2, Twins, LeViT, GC ViT or "
            f"ViP, in the official or timm layout); its first keys are: {first}. "
            f"Pass family/arch and layout explicitly if it is one.")


def _resolve_source(state_dict: StateDict, family: Optional[str], layout: Optional[str], source: str,
                    model_label: Optional[str]) -> Tuple[FamilyMapping, str]:
    """The mapping and layout to convert with: the given ones, else those detected from the keys."""
    detected = detect_source(state_dict)
    if family is None:
        families = sorted({fam for fam, _ in detected})
        if not families:
            raise CheckpointError(_unknown_source_message(state_dict, source))
        if len(families) > 1:
            raise CheckpointError(f"{source} matches several families ({', '.join(families)}); pass the arch")
        family = families[0]
    mapping = get_mapping(family)
    if layout is None:
        layouts = [lay for fam, lay in detected if fam == family]
        if not layouts and detected:  # a checkpoint of another family: name both
            other = convert_state_dict(state_dict, source=source)
            target = model_label or f"a {mapping.display} model"
            raise CheckpointError(
                f"{source}: checkpoint is {other.label} ({get_mapping(other.family).display}, {other.layout} "
                f"layout) but the model is {target} ({mapping.display}); use a {mapping.display} checkpoint, or a "
                f"model of the checkpoint's architecture")
        if not layouts:
            raise CheckpointError(_unknown_source_message(state_dict, source))
        layout = layouts[0]
    if layout not in mapping.layouts:
        raise CheckpointError(f"{source}: {mapping.display} has no '{layout}' layout; "
                              f"supported: {', '.join(mapping.layouts)}")
    return mapping, layout


def convert_state_dict(state_dict: StateDict, family: Optional[str] = None, layout: Optional[str] = None,
                       source: str = "<state dict>", model_label: Optional[str] = None) -> ConvertedCheckpoint:
    """Convert a raw checkpoint state dict to pvt_d2 keys.

    Args:
        state_dict: the checkpoint's tensors, as stored.
        family: the family it must be (e.g. the model's); detected if None.
            A checkpoint of another family is refused, naming both.
        layout: ``"official"``, ``"timm"`` or ``"pvt_d2"``; detected if None.
        source: the file name, for messages.
        model_label: the model's name, for the refusal message.

    Raises:
        CheckpointError: unrecognised checkpoint, or of another family.
    """
    mapping, layout = _resolve_source(state_dict, family, layout, source, model_label)
    try:
        converted, dropped = mapping.convert(state_dict, layout)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    hparams = mapping.hparams(converted)
    family = mapping.family
    return ConvertedCheckpoint(converted, family, layout, match_arch(family, hparams), hparams, dropped, source)


def convert_checkpoint(path: str, arch: Optional[str] = None, layout: Optional[str] = None,
                       key: Optional[str] = None) -> ConvertedCheckpoint:
    """Read and convert a checkpoint file; with ``arch``, refuse one of another family or variant.

    Args:
        path: ``.pth`` / ``.pth.tar`` / ``.bin`` / ``.safetensors`` file.
        arch: registered variant the checkpoint must be (detected if None).
        layout: source layout; detected if None.
        key: nested entry holding the weights (default: found automatically).
    """
    state_dict, _ = read_state_dict(path, key)
    family = get_arch(arch).family if arch else None
    converted = convert_state_dict(state_dict, family, layout, source=path, model_label=arch)
    if arch:
        _check_variant(converted, arch_hparams(arch), arch)
    return converted


def _check_variant(converted: ConvertedCheckpoint, expected: Dict[str, Any], model_label: str) -> None:
    """Refuse a checkpoint whose variant numbers differ from the model's, naming both."""
    if _hp_equal(converted.hparams, expected):
        return
    differ = [k for k in expected if k not in converted.hparams
              or not _hp_equal({k: converted.hparams[k]}, {k: expected[k]})]
    raise CheckpointError(
        f"{converted.source}: checkpoint is {converted.arch or 'an unregistered ' + converted.family + ' variant'} "
        f"(detected from {_format_hparams(converted.hparams, differ)}) but the model is {model_label} "
        f"({_format_hparams(expected, differ)})")


# ---------------------------------------------------------------------------
# Loading into a model
# ---------------------------------------------------------------------------
def bottom_up_backbone(model: nn.Module) -> nn.Module:
    """The bottom-up backbone of any detectron2 detector, or ``model`` itself when it has none.

    ``model.backbone.bottom_up`` under an FPN, ``model.backbone`` without one;
    a ``DistributedDataParallel`` / ``DataParallel`` wrapper is looked through.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "bottom_up", backbone)


def find_backbone(model: nn.Module) -> PyramidBackbone:
    """The pvt_d2 backbone of a detector (:func:`bottom_up_backbone`), or the model itself if it is one.

    Raises:
        TypeError: the model holds no pvt_d2 backbone there.
    """
    backbone = bottom_up_backbone(model)
    if isinstance(backbone, PyramidBackbone):
        return backbone
    raise TypeError(f"{type(model).__name__} has no pvt_d2 backbone (looked at the model, model.backbone and "
                    f"model.backbone.bottom_up)")


def describe_backbone(backbone: PyramidBackbone) -> Tuple[str, Optional[str], Dict[str, Any]]:
    """``(family, registered variant or None, variant numbers)`` of a backbone instance."""
    families = {get_arch(n).family for n in list_architectures() if get_arch(n).model_cls is type(backbone)}
    if len(families) != 1:
        raise TypeError(f"{type(backbone).__name__} is not a registered pvt_d2 architecture")
    family = families.pop()
    hparams = get_mapping(family).hparams(backbone.state_dict())
    return family, match_arch(family, hparams), hparams


def new_parameter_prefixes(family: str) -> Tuple[str, ...]:
    """State-dict prefixes of the backbone parameters that no ImageNet checkpoint of ``family`` has."""
    return ALWAYS_NEW_PREFIXES + tuple(get_mapping(family).new_prefixes)


def load_converted(backbone: PyramidBackbone, converted: ConvertedCheckpoint,
                   model_label: Optional[str] = None) -> LoadReport:
    """Load converted weights into ``backbone``; refuse any partial or mismatched load.

    Raises:
        CheckpointError: wrong family or variant, or any missing (not new),
            unexpected or shape-mismatched key. Nothing is loaded then.
    """
    family, arch, hparams = describe_backbone(backbone)
    mapping = get_mapping(family)
    label = model_label or arch or f"a {mapping.display} model ({_format_hparams(hparams)})"
    if converted.family != family:
        raise CheckpointError(
            f"{converted.source}: checkpoint is {converted.label} ({get_mapping(converted.family).display}) but the "
            f"model is {label} ({mapping.display})")
    _check_variant(converted, hparams, label)

    model_state = backbone.state_dict()
    weights = converted.state_dict
    for flag in _LAYOUT_FLAGS:  # entries that follow the weights (they set the model's mode when loaded)
        model_state.pop(flag, None)
        if flag in weights:
            model_state[flag] = weights[flag]
    new_prefixes = new_parameter_prefixes(family)
    absent = [k for k in model_state if k not in weights]
    is_new = [k.startswith(new_prefixes) or k.endswith(".num_batches_tracked") for k in absent]
    mismatched = [(k, tuple(weights[k].shape), tuple(model_state[k].shape))
                  for k in weights if k in model_state and weights[k].shape != model_state[k].shape]
    bad_shape = {k for k, _, _ in mismatched}
    report = LoadReport(
        source=converted.source, model=label, family=family, layout=converted.layout,
        loaded=[k for k in weights if k in model_state and k not in bad_shape],
        new=[k for k, n in zip(absent, is_new) if n], dropped=list(converted.dropped),
        missing=[k for k, n in zip(absent, is_new) if not n],
        unexpected=[k for k in weights if k not in model_state], mismatched=mismatched)
    if not report.ok:
        raise CheckpointError(
            f"{converted.source}: refusing a partial load into {label} ({converted.layout} layout):\n"
            f"{report.table()}\n{report.problems()}")
    incompatible = backbone.load_state_dict(weights, strict=False)
    assert not incompatible.unexpected_keys and set(incompatible.missing_keys) == set(report.new), incompatible
    mode = (", first-generation GC ViT global queries reproduced"
            if getattr(backbone, "first_generation_queries", False) else "")
    logger.info(f"Loaded ImageNet weights for {label} from {converted.source} ({converted.layout} layout{mode}):\n"
                f"{report.table()}")
    return report


def load_pretrained_backbone(model: nn.Module, path: str, layout: Optional[str] = None,
                             key: Optional[str] = None) -> LoadReport:
    """Load an ImageNet checkpoint into the backbone of ``model`` (``MODEL.PVT_D2.PRETRAINED``).

    Args:
        model: a detectron2 model (FPN or plain backbone) or a pvt_d2 backbone.
        path: checkpoint file in the official, timm or pvt_d2 layout, or an
            http(s) URL of one: downloaded once into the cache
            (:func:`.download.resolve_pretrained`).
        layout: force the source layout instead of detecting it.
        key: nested entry holding the weights.

    Returns:
        The :class:`LoadReport` (also logged as a table).

    Raises:
        CheckpointError: unreadable or unsafe file, another family or
            variant, or any key that would not load; a URL neither cached nor
            downloadable (:class:`.download.WeightsDownloadError`).
    """
    backbone = find_backbone(model)
    family, arch, hparams = describe_backbone(backbone)
    label = arch or f"a {get_mapping(family).display} model ({_format_hparams(hparams)})"
    local = resolve_pretrained(path)
    state_dict, _ = read_state_dict(local, key)
    source = f"{path} (cached as {local})" if is_url(path) else path
    converted = convert_state_dict(state_dict, family, layout, source=source, model_label=label)
    return load_converted(backbone, converted, label)


def save_for_detectron2(converted: ConvertedCheckpoint, path: str) -> Dict[str, Any]:
    """Write converted weights as a detectron2 ``MODEL.WEIGHTS`` file.

    Keys are stored relative to the backbone and flagged with
    ``matching_heuristics``: detectron2's ``DetectionCheckpointer`` then
    matches each one to the model key it is a complete suffix of, i.e.
    ``backbone.bottom_up.<key>`` in FPN detectors and ``backbone.<key>`` with
    the plain backbone, so one file serves both.

    Returns:
        The saved object.

    Raises:
        CheckpointError: first-generation GC ViT weights, whose query-layout
            entry detectron2's checkpointer would drop (use them through
            ``MODEL.PVT_D2.PRETRAINED``, which keeps it).
    """
    if any(flag in converted.state_dict for flag in _LAYOUT_FLAGS):
        raise CheckpointError(
            f"{converted.source} holds first-generation GC ViT weights (levels.*.to_q_global), which give their "
            f"features only with that code's global-query layout; detectron2's MODEL.WEIGHTS loader cannot carry "
            f"that setting, so no MODEL.WEIGHTS file is written. Use MODEL.PVT_D2.PRETRAINED {converted.source} "
            f"instead: it loads them and switches the backbone to that layout.")
    data = {
        "model": {k: v.contiguous() for k, v in converted.state_dict.items()},
        "__author__": "pvt_d2",
        "matching_heuristics": True,
        "pvt_d2": {"arch": converted.arch or "", "family": converted.family, "source_layout": converted.layout,
                   "source": os.path.basename(converted.source)},
    }
    atomic_torch_save(data, path)
    return data
