"""ImageNet checkpoints (official repositories or timm) for pvt_d2 backbones.

- :mod:`.io`        safe reading of ``.pth`` / ``.pth.tar`` / ``.bin`` / ``.safetensors``
- :mod:`.mappings`  one key mapping per family and source layout, variant identification
- :mod:`.convert`   detection, conversion, checked loading with a report, detectron2 export
- :mod:`.checkpointer` the detectron2 checkpointer used for training (safe reading, atomic saving)

``load_pretrained_backbone(model, path)`` is what ``MODEL.PVT_D2.PRETRAINED``
runs; ``tools/convert_pretrained.py`` writes files for ``MODEL.WEIGHTS``.
"""
from .convert import (
    ConvertedCheckpoint,
    LoadReport,
    convert_checkpoint,
    convert_state_dict,
    detect_source,
    find_backbone,
    load_converted,
    load_pretrained_backbone,
    save_for_detectron2,
)
from .checkpointer import AtomicCheckpointer, run_info_from_config
from .io import CheckpointError, atomic_torch_save, read_state_dict
from .mappings import MAPPINGS, get_mapping

__all__ = [
    "AtomicCheckpointer",
    "CheckpointError",
    "ConvertedCheckpoint",
    "LoadReport",
    "MAPPINGS",
    "atomic_torch_save",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_source",
    "find_backbone",
    "get_mapping",
    "load_converted",
    "load_pretrained_backbone",
    "read_state_dict",
    "run_info_from_config",
    "save_for_detectron2",
]
