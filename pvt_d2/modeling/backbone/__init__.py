"""Backbones. One file per family; importing this package registers them all.

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
"""
import importlib

from .base import PyramidBackbone
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
    "PyramidBackbone",
    "build_pvt_d2_backbone",
    "build_pvt_d2_fpn_backbone",
    "build_pvt_d2_retinanet_fpn_backbone",
    "create_backbone",
    "get_arch",
    "list_architectures",
    "register_architectures",
]

# Family modules register their variants on import. A family whose file is not
# present yet is simply absent from the registry.
for _family in ("pvt", "pvt_v2", "twins", "gcvit", "levit", "vip"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as e:  # pragma: no cover - only while a family is missing
        if e.name != f"{__name__}.{_family}":
            raise
