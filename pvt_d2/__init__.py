"""pvt_d2: pyramid vision transformer and MLP backbones for detectron2.

Importing the package registers every backbone architecture and the detectron2
backbone builders (``build_pvt_d2_backbone``, ``build_pvt_d2_fpn_backbone``,
``build_pvt_d2_retinanet_fpn_backbone``).
"""
from .config import add_pvt_d2_config, get_pvt_d2_cfg, load_config  # noqa: F401
from .modeling import create_backbone, get_arch, list_architectures  # noqa: F401

__version__ = "0.1.0"
