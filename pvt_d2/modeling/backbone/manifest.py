"""One manifest per family: every fact about its variants, written once.

What timm's ``default_cfgs`` are for a model file, a :class:`FamilyManifest`
is for a pvt_d2 family: it ends the family file and states its variants
(architecture table, ImageNet weights, config short name, detection drop
path, official detection configs, published detector numbers) and the
family-level facts (display name, pyramid levels, config options, what every
detector config of the family sets). :func:`register_family` makes it known
and registers its architectures (:func:`~.registry.register_architectures`)
and checkpoint mapping (:func:`~.key_mapping.register_mapping`).

Everything else reads it, none of it restates it:
:mod:`pvt_d2.checkpoint.sources` (weights), :mod:`pvt_d2.model_zoo.recipes`
and :mod:`pvt_d2.model_zoo.generate` (the detector configs),
:mod:`pvt_d2.model_zoo.table` (``MODEL_ZOO.md``) and :mod:`pvt_d2.config`
(levels and family options). ``docs/ADDING_A_FAMILY.md`` walks through a new one.
"""
import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Type

from .base import DEFAULT_OUT_FEATURES
from .key_mapping import MAPPINGS, FamilyMapping, register_mapping
from .registry import register_architectures, unregister_architectures

__all__ = [
    "Weights",
    "Variant",
    "Option",
    "FamilyManifest",
    "register_family",
    "unregister_family",
    "registered_family",
    "families",
    "get_family",
    "variants",
    "get_variant",
]


@dataclass(frozen=True)
class Weights:
    """Where the ImageNet checkpoint of one variant comes from.

    Attributes:
        url: what ``MODEL.PVT_D2.PRETRAINED`` names: a direct download, or
            (``manual``) the page the authors link; ``""`` when none is public.
        filename: the file's name in the download cache.
        origin: ``"official"`` (the authors' file) or ``"timm"`` (timm's copy).
        manual: True when ``url`` is no direct download: the file must be put
            into the cache by hand.
        note: why this source, for the docs.
        arch: the variant's name, filled in by :class:`Variant`, which also
            replaces ``{arch}`` in ``url`` and ``filename`` by it (a family-wide template).
    """

    url: str
    filename: str
    origin: str = "official"
    manual: bool = False
    note: str = ""
    arch: str = ""

    @property
    def available(self) -> bool:
        """Whether any public checkpoint exists."""
        return bool(self.url)


@dataclass(frozen=True)
class Variant:
    """One registered architecture and what the detector configs and the model zoo say about it.

    Attributes:
        name: architecture name (``MODEL.PVT_D2.ARCH``).
        kwargs: constructor arguments of the family's model class.
        weights: its ImageNet checkpoint.
        short: config short name (``retinanet_<short>.yaml``).
        drop_path: drop path rate of the official detection backbone.
        official_name: the variant's name in the official detection configs
            (``{v}`` of :attr:`FamilyManifest.official_configs`); default ``name``.
        official_configs: detector -> official config file of this variant
            only; ``None`` where the family's pattern names a file that does not exist.
        small_batch: detectors the paper trained at batch 8 (1 image per GPU).
        published_ap: detector -> COCO val2017 box AP, or ``"box / mask"``, as published.
        published_params: detector -> detector parameters (M) as published.
    """

    name: str
    kwargs: Dict[str, Any]
    weights: Weights
    short: str
    drop_path: float
    official_name: str = ""
    official_configs: Dict[str, Optional[str]] = field(default_factory=dict)
    small_batch: Tuple[str, ...] = ()
    published_ap: Dict[str, str] = field(default_factory=dict)
    published_params: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        w = self.weights  # a family-wide template names the variant "{arch}"
        object.__setattr__(self, "weights", replace(w, arch=self.name, url=w.url.format(arch=self.name),
                                                    filename=w.filename.format(arch=self.name)))
        if not self.official_name:
            object.__setattr__(self, "official_name", self.name)


@dataclass(frozen=True)
class Option:
    """A family's ``MODEL.PVT_D2.<FAMILY>.<key>`` config key, as :func:`pvt_d2.config.validate_config` checks it.

    The key itself (default: the model's own, ``None`` or ``[]``) is defined
    and documented in :mod:`pvt_d2.config`.

    Attributes:
        key: the key's last part, e.g. ``"ATTN_MODE"``.
        choices: allowed values besides the unset default.
        check: for values that are no choice list, True when a value is allowed.
        allowed: the error message's "what is allowed" for ``check``.
    """

    key: str
    choices: Tuple[Any, ...] = ()
    check: Optional[Callable[[Any], bool]] = None
    allowed: str = ""


@dataclass(frozen=True)
class FamilyManifest:
    """All facts of one family (see the module docstring).

    Attributes:
        model_cls: the family's :class:`~.base.PyramidBackbone` subclass.
        mapping: its checkpoint mapping; the family's name and display name are the mapping's.
        variants: every registered variant, smallest first.
        levels: pyramid levels the backbone can return.
        options: its ``MODEL.PVT_D2.<FAMILY>`` keys.
        detection_cfg: ``MODEL.PVT_D2`` keys (``"GCVIT.WINDOW_SIZES"``) and the
            values every detector config of the family states.
        recipe: schedule (``"1x"`` / ``"3x"``) -> solver keys that differ from
            the common recipe (:func:`pvt_d2.model_zoo.recipes.recipe`).
        official_configs: detector -> the official config file each variant
            follows (``{v}``: :attr:`Variant.official_name`).
        modelled_on: detector -> what a config without an official file of its
            own follows, where the family's differs from the common one.
        paper: the publication of the published numbers (full reference).
        cite: the same, short (``"Wang et al., ICCV 2021"``).
        params_source: where the published detector sizes are printed.
        published_params_include_classifier: the published detector sizes
            count the ImageNet classifier the official detection backbone
            carries unused (``C5 x 1000 + 1000`` parameters).
    """

    model_cls: Type
    mapping: FamilyMapping
    variants: Tuple[Variant, ...]
    levels: Tuple[str, ...] = tuple(DEFAULT_OUT_FEATURES)
    options: Tuple[Option, ...] = ()
    detection_cfg: Dict[str, Any] = field(default_factory=dict)
    recipe: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    official_configs: Dict[str, str] = field(default_factory=dict)
    modelled_on: Dict[str, str] = field(default_factory=dict)
    paper: str = ""
    cite: str = ""
    params_source: str = ""
    published_params_include_classifier: bool = False

    @property
    def name(self) -> str:
        """Family name (``"pvt_v2"``), the registry's and the checkpoint mapping's."""
        return self.mapping.family

    @property
    def display(self) -> str:
        """Display name (``"PVT v2"``)."""
        return self.mapping.display

    @property
    def cfg_node(self) -> str:
        """Name of its config node under ``MODEL.PVT_D2`` (``"GCVIT"``)."""
        return self.name.upper()

    def variant(self, name: str) -> Variant:
        """The :class:`Variant` called ``name``."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"{self.display} has no variant '{name}'")


_FAMILIES: Dict[str, FamilyManifest] = {}


def register_family(manifest: FamilyManifest) -> FamilyManifest:
    """Make a family known: its manifest, architectures and checkpoint mapping; returns ``manifest``.

    Raises:
        KeyError: the family, one of its variant names or short names is already registered.
    """
    if manifest.name in _FAMILIES:
        raise KeyError(f"family '{manifest.name}' is registered twice")
    shorts = {v.short for m in _FAMILIES.values() for v in m.variants}
    for v in manifest.variants:
        if v.short in shorts:
            raise KeyError(f"config short name '{v.short}' of {v.name} is taken")
        shorts.add(v.short)
    register_architectures(manifest.name, manifest.model_cls, {v.name: v.kwargs for v in manifest.variants})
    if MAPPINGS.get(manifest.name) is not manifest.mapping:
        register_mapping(manifest.mapping)
    _FAMILIES[manifest.name] = manifest
    return manifest


def unregister_family(name: str) -> None:
    """Forget a family registered by :func:`register_family` (tests, experiments)."""
    _FAMILIES.pop(name)
    unregister_architectures(name)
    MAPPINGS.pop(name, None)


@contextlib.contextmanager
def registered_family(manifest: FamilyManifest) -> Iterator[FamilyManifest]:
    """``with registered_family(manifest):`` the family is known inside the block only."""
    register_family(manifest)
    try:
        yield manifest
    finally:
        unregister_family(manifest.name)


def families() -> Tuple[FamilyManifest, ...]:
    """Every registered family, in registration order."""
    return tuple(_FAMILIES.values())


def get_family(name: str) -> FamilyManifest:
    """The manifest of family ``name``; an unknown name lists the known ones."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown family '{name}'; known: {', '.join(_FAMILIES)}") from None


def variants() -> Tuple[Variant, ...]:
    """Every registered variant, family by family."""
    return tuple(v for m in _FAMILIES.values() for v in m.variants)


def get_variant(arch: str) -> Tuple[FamilyManifest, Variant]:
    """``(family manifest, variant)`` of architecture ``arch``."""
    for m in _FAMILIES.values():
        for v in m.variants:
            if v.name == arch:
                return m, v
    raise KeyError(f"unknown architecture '{arch}'; known: {', '.join(sorted(v.name for v in variants()))}")
