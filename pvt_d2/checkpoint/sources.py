"""Where the ImageNet checkpoint of every registered architecture comes from.

One :class:`WeightSource` per architecture of :func:`pvt_d2.modeling.list_architectures`:
the file the paper's authors published where a direct download exists, else
timm's copy of the same weights, else (ViP) the authors' link for a manual
download. ``MODEL.PVT_D2.PRETRAINED`` of the generated configs is
:func:`pretrained_url` of the backbone's architecture; :mod:`.download`
fetches it once into the cache under :attr:`WeightSource.filename`.

Facts followed (URLs only, no code):

* PVT v1 / v2: release ``v2`` of whai362/PVT (``classification/README.md``).
* LeViT: the ``weights`` entries of facebookresearch/LeViT ``levit.py``.
* Twins: the authors' README links Google Drive files only (no direct
  download), so timm's Hugging Face copies ``timm/twins_*.in1k`` are used.
* GC ViT: the NVlabs/GCVit README links Google Drive and the Hugging Face repo
  ``nvidia/GCViT`` (CC-BY-NC-SA-4.0); the direct files used are those timm's
  ``gcvit.py`` loads, NVIDIA's weights re-published in timm's layout.
* ViP: Andrew-Qibin/VisionPermutator's README links Google Drive files for
  ViP-S/7, M/7 and L/7 and nothing else; timm has no ViP. They must be
  downloaded by hand into the cache (:func:`.download.cache_path`). ViP-S/14
  has no public checkpoint at all.
"""
from dataclasses import dataclass
from typing import Dict, Optional

__all__ = ["WeightSource", "SOURCES", "get_source", "source_for_url", "pretrained_url"]


@dataclass(frozen=True)
class WeightSource:
    """The ImageNet checkpoint of one architecture.

    Attributes:
        arch: registered architecture name.
        url: what ``MODEL.PVT_D2.PRETRAINED`` names: a direct-download URL,
            or (``manual``) the page the authors link; ``""`` when no
            checkpoint is public.
        filename: the file's name in the download cache.
        origin: ``"official"`` (the authors' file) or ``"timm"`` (timm's copy).
        manual: True when ``url`` is not a direct download (Google Drive): the
            file must be put into the cache by hand.
        note: why this source, for the docs.
    """

    arch: str
    url: str
    filename: str
    origin: str
    manual: bool = False
    note: str = ""

    @property
    def available(self) -> bool:
        """Whether any public checkpoint exists."""
        return bool(self.url)


_PVT_RELEASE = "https://github.com/whai362/PVT/releases/download/v2/{}.pth"
_LEVIT = "https://dl.fbaipublicfiles.com/LeViT/{}.pth"
_TIMM_HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
_TIMM_GCVIT = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights-morevit/{}.pth"

_TWINS_NOTE = "the authors' README links Google Drive only; timm's copy of the same weights"
_GCVIT_NOTE = "NVlabs/GCVit links Google Drive and nvidia/GCViT on Hugging Face; timm's direct copy"
_VIP_NOTE = "the authors' README links Google Drive only and timm has no ViP: download by hand into the cache"


def _build() -> Dict[str, WeightSource]:
    table = {}

    def add(arch, url, filename, origin, manual=False, note=""):
        table[arch] = WeightSource(arch, url, filename, origin, manual, note)

    for name in ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2",
                 "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5"):
        add(name, _PVT_RELEASE.format(name), f"{name}.pth", "official")
    for name, file in (("levit_128s", "LeViT-128S-96703c44"), ("levit_128", "LeViT-128-b88c2750"),
                       ("levit_192", "LeViT-192-92712e41"), ("levit_256", "LeViT-256-13b5763e"),
                       ("levit_384", "LeViT-384-9bdaf2e2")):
        add(name, _LEVIT.format(file), f"{file}.pth", "official")
    for kind in ("pcpvt", "svt"):
        for size in ("small", "base", "large"):
            hub_id = f"twins_{kind}_{size}.in1k"
            add(f"twins_{kind}_{size}", _TIMM_HF.format(hub_id), f"{hub_id}.safetensors", "timm", note=_TWINS_NOTE)
    for name, file in (("gcvit_xxtiny", "gcvit_xxtiny_224_nvidia-d1d86009"),
                       ("gcvit_xtiny", "gcvit_xtiny_224_nvidia-274b92b7"),
                       ("gcvit_tiny", "gcvit_tiny_224_nvidia-ac783954"),
                       ("gcvit_small", "gcvit_small_224_nvidia-4e98afa2"),
                       ("gcvit_base", "gcvit_base_224_nvidia-f009139b")):
        add(name, _TIMM_GCVIT.format(file), f"{file}.pth", "timm", note=_GCVIT_NOTE)
    for name, drive_id in (("vip_s7", "1cX6eauDrsGsLSZnqsX7cl0oiKX8Dzv5z"),
                           ("vip_m7", "15y5WMypthpbBFdc01E3mJCZit7q0Yn8m"),
                           ("vip_l7", "14F5IXGXmB_3jrwK33Efae-WEb5D_G85c")):
        add(name, f"https://drive.google.com/file/d/{drive_id}/view?usp=sharing", f"{name}.pth", "official",
            manual=True, note=_VIP_NOTE)
    add("vip_s14", "", "vip_s14.pth", "official",
        note="ViP-Small/14 appears in the paper but its weights were never released: trained from scratch")
    return table


#: Architecture name -> its ImageNet checkpoint.
SOURCES: Dict[str, WeightSource] = _build()


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
    """The table entry whose URL is ``url``, or None."""
    for source in SOURCES.values():
        if source.url and source.url == url:
            return source
    return None


def pretrained_url(arch: str) -> str:
    """What ``MODEL.PVT_D2.PRETRAINED`` should say for ``arch`` (``""``: no public checkpoint)."""
    return get_source(arch).url
