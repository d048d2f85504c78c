"""Where the ImageNet checkpoint of every registered architecture comes from.

Read from the families' manifests (:class:`~pvt_d2.modeling.backbone.manifest.Weights`
of each :class:`~pvt_d2.modeling.backbone.manifest.Variant`, at the end of each
family file, with the reason for each source): the file the paper's authors
published where a direct download exists, else timm's copy of the same
weights, else (ViP) the authors' link for a manual download.
``MODEL.PVT_D2.PRETRAINED`` of the generated configs is :func:`pretrained_url`
of the backbone's architecture; :mod:`.download` fetches it once into the
cache under :attr:`WeightSource.filename`.
"""
from typing import Iterator, Mapping, Optional

from ..modeling.backbone.manifest import Weights, variants

__all__ = ["WeightSource", "SOURCES", "get_source", "source_for_url", "pretrained_url"]

#: The ImageNet checkpoint of one architecture (``arch``, ``url``, ``filename``, ``origin``, ``manual``, ``note``).
WeightSource = Weights


class _Sources(Mapping):
    """Architecture name -> :class:`WeightSource`, read from the registered manifests on every access."""

    def __getitem__(self, arch: str) -> WeightSource:
        for v in variants():
            if v.name == arch:
                return v.weights
        raise KeyError(arch)

    def __iter__(self) -> Iterator[str]:
        return iter([v.name for v in variants()])

    def __len__(self) -> int:
        return len(variants())


#: Architecture name -> its ImageNet checkpoint.
SOURCES: Mapping[str, WeightSource] = _Sources()


def get_source(arch: str) -> WeightSource:
    """The :class:`WeightSource` of a registered architecture.

    Raises:
        KeyError: an architecture without an entry (names the known ones).
    """
    try:
        return SOURCES[arch]
    except KeyError:
        raise KeyError(f"no ImageNet checkpoint source for '{arch}'; known: {', '.join(sorted(SOURCES))}") from None


def source_for_url(url: str) -> Optional[WeightSource]:
    """The entry whose URL is ``url``, or None."""
    for source in SOURCES.values():
        if source.url and source.url == url:
            return source
    return None


def pretrained_url(arch: str) -> str:
    """What ``MODEL.PVT_D2.PRETRAINED`` should say for ``arch`` (``""``: no public checkpoint)."""
    return get_source(arch).url
