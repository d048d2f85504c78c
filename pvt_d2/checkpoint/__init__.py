"""ImageNet checkpoints (official repositories or timm) for pvt_d2 backbones.

- :mod:`.io`        safe reading of ``.pth`` / ``.pth.tar`` / ``.bin`` / ``.safetensors``
- the key mappings themselves live beside each model (``FamilyMapping`` at the end of every
  family file, registered in :mod:`pvt_d2.modeling.backbone.key_mapping`)
- :mod:`.convert`   detection, conversion, checked loading with a report, detectron2 export
- :mod:`.sources`   the official ImageNet checkpoint (URL, cache file name) of every architecture
- :mod:`.download`  ``MODEL.PVT_D2.PRETRAINED`` URLs downloaded once into ``$PVT_D2_CACHE``, atomically
- :mod:`.checkpointer` the detectron2 checkpointer used for training (safe reading, atomic saving)

``load_pretrained_backbone(model, path)`` is what ``MODEL.PVT_D2.PRETRAINED``
runs; ``tools/convert_pretrained.py`` writes files for ``MODEL.WEIGHTS``.
"""
from ..modeling.backbone.key_mapping import MAPPINGS, get_mapping
from .checkpointer import AtomicCheckpointer, run_info_from_config
from .convert import (
    ConvertedCheckpoint,
    LoadReport,
    bottom_up_backbone,
    convert_checkpoint,
    convert_state_dict,
    detect_source,
    find_backbone,
    load_converted,
    load_pretrained_backbone,
    save_for_detectron2,
)
from .download import WeightsDownloadError, cache_path, resolve_pretrained
from .io import CheckpointError, atomic_torch_save, read_state_dict
from .sources import SOURCES, WeightSource, get_source, pretrained_url

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "ConvertedCheckpoint",
    "LoadReport",
    "MAPPINGS",
    "SOURCES",
    "WeightSource",
    "WeightsDownloadError",
    "atomic_torch_save",
    "bottom_up_backbone",
    "cache_path",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_source",
    "find_backbone",
    "get_mapping",
    "get_source",
    "load_converted",
    "load_pretrained_backbone",
    "pretrained_url",
    "read_state_dict",
    "resolve_pretrained",
    "run_info_from_config",
    "save_for_detectron2",
]
