"""pvt_d2: pyramid vision transformer and MLP backbones for detectron2.

Importing the package registers every backbone architecture and the detectron2
backbone builders (``build_pvt_d2_backbone``, ``build_pvt_d2_fpn_backbone``,
``build_pvt_d2_retinanet_fpn_backbone``).
"""
import importlib.util

if importlib.util.find_spec("detectron2") is None:
    raise ImportError(
        "pvt_d2 needs detectron2, which is not installed in this Python environment. Install it with "
        "`bash install.sh` from a pvt_d2 checkout (it installs the sal-detectron2 wheel), or build it from source: "
        "pip install 'git+https://github.com/facebookresearch/detectron2.git' (see README.md, Set-up).")

from .config import add_pvt_d2_config, get_pvt_d2_cfg, load_config  # noqa: E402, F401
from .modeling import create_backbone, get_arch, list_architectures  # noqa: E402, F401
from .engine import optim as _optim  # noqa: E402, F401  (checks that a config's SOLVER.OPTIMIZER is the one used)

__version__ = "0.1.0"
