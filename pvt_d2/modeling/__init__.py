"""Models: the backbones (one file per family under ``backbone/``), their detectron2 builders and ROI heads."""
from .backbone import create_backbone, get_arch, list_architectures  # noqa: F401  (registers everything)
from .roi_heads import PaperCascadeROIHeads  # noqa: F401  (registers the cascade heads)
