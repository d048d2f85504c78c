"""Shared fixtures: a tiny training config on the synthetic set, and a temporary dataset root."""
import logging
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

torch.set_num_threads(2)
# A tool's log handler may still hold the stdout/stderr that pytest captured for an earlier test and has
# closed since; writing to it must not print a "Logging error" traceback into a later test's stderr.
logging.raiseExceptions = False


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory):
    """A private DETECTRON2_DATASETS with the synthetic set generated once per session."""
    root = tmp_path_factory.mktemp("datasets")
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)
    from pvt_d2.data import ensure_synthetic_dataset
    from pvt_d2.data.synthetic import dataset_root as synthetic_root

    ensure_synthetic_dataset(str(root))
    assert os.path.isdir(synthetic_root(str(root)))
    yield str(root)
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = old


def tiny_train_cfg(config_name: str, output_dir: str, extra=None):
    """A config from ``configs/`` shrunk for a CPU smoke run on the synthetic set.

    Two images per batch at 96-128 px, a few iterations, small FPN and heads,
    no workers, evaluation on the first images of ``synthetic_val`` only.
    """
    from pvt_d2.config import load_config
    from pvt_d2.engine import use_cpu_if_no_cuda

    opts = [
        "DATASETS.TRAIN", "('synthetic_train',)", "DATASETS.TEST", "('synthetic_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES", "4", "MODEL.RETINANET.NUM_CLASSES", "4",
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "32",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RETINANET.TOPK_CANDIDATES_TEST", "100",
        "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "False",
        "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN", "160",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output_dir,
        "MODEL.PVT_D2.PRETRAINED", "",  # offline and from scratch: the configs name ImageNet checkpoints
    ]
    cfg = load_config(os.path.join(CONFIGS, config_name), opts + list(extra or []))
    use_cpu_if_no_cuda(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """Fail the test that leaves autograd globally disabled (it would break every later test)."""
    yield
    assert torch.is_grad_enabled(), "this test left torch.set_grad_enabled(False) behind"
