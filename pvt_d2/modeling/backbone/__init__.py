"""Backbones. One file per family, ending with its manifest; importing this package registers them all.

- ``pvt.py``      PVT v1 (pvt_tiny ... pvt_large)
- ``pvt_v2.py``   PVT v2 (pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li)
- ``twins.py``    Twins PCPVT and SVT
- ``gcvit.py``    GC ViT
- ``levit.py``    LeViT
- ``vip.py``      Vision Permutator
- ``base.py``     the detectron2 Backbone contract every family implements
- ``layers.py``   shared blocks (position embeddings, attention core, SRA, MLP, patch embedding)
- ``export_ops.py`` shape ops that stay symbolic while a model is recorded (padding, windows, crops)
- ``key_mapping.py`` checkpoint-mapping pieces; each family file ends with its own mapping
- ``registry.py`` architecture names -> models, and the detectron2 builders
- ``manifest.py`` the facts of each family (variants, weights, detection, published numbers)

:data:`FAMILY_MODULES` is the one list of family files (their order is the
model zoo's); adding a family: ``docs/ADDING_A_FAMILY.md``.
"""
import importlib

from .base import PyramidBackbone
from .manifest import FamilyManifest, families, get_family, get_variant, register_family, variants
from .registry import (
    build_pvt_d2_backbone,
    build_pvt_d2_fpn_backbone,
    build_pvt_d2_retinanet_fpn_backbone,
    create_backbone,
    get_arch,
    list_architectures,
    register_architectures,
)

__all__ = [
    "FAMILY_MODULES",
    "FamilyManifest",
    "PyramidBackbone",
    "build_pvt_d2_backbone",
    "build_pvt_d2_fpn_backbone",
    "build_pvt_d2_retinanet_fpn_backbone",
    "create_backbone",
    "families",
    "get_arch",
    "get_family",
    "get_variant",
    "list_architectures",
    "register_architectures",
    "register_family",
    "variants",
]

#: The family files; each registers its manifest (:func:`register_family`) on import.
FAMILY_MODULES = ("pvt", "pvt_v2", "twins", "gcvit", "levit", "vip")

for _family in FAMILY_MODULES:
    importlib.import_module(f"{__name__}.{_family}")
