"""Models: the backbones (one file per family under ``backbone/``) and their detectron2 builders."""
from .backbone import create_backbone, get_arch, list_architectures  # noqa: F401  (registers everything)
