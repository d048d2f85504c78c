"""The detectron2 trainer used by ``tools/train_net.py``.

On top of detectron2's ``DefaultTrainer`` it adds the AdamW recipe
(:mod:`.optim`), COCO evaluators for box (and mask) models, atomic
checkpoints (:mod:`.checkpoint`), the optional ImageNet backbone weights
(``MODEL.PVT_D2.PRETRAINED``) and multi-process training on CPU (gloo).
"""
import contextlib
import logging
import os
from unittest import mock

import torch
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm

from ..data import prepare_datasets
from .checkpoint import AtomicCheckpointer
from .optim import build_optimizer

__all__ = ["Trainer", "create_ddp_model", "use_cpu_if_no_cuda"]

logger = logging.getLogger("pvt_d2")


def create_ddp_model(model, *, fp16_compression: bool = False, **kwargs):
    """detectron2's ``create_ddp_model`` that also works for CPU modules.

    detectron2 passes ``device_ids=[local_rank]``, which DistributedDataParallel
    rejects for a module on the CPU; for those no ``device_ids`` is given.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, fp16_compression=fp16_compression, **kwargs)


def use_cpu_if_no_cuda(cfg) -> bool:
    """Switch a CUDA config to the CPU (AMP off) when no GPU is present. Returns True if it did."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        frozen = cfg.is_frozen()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        cfg.SOLVER.AMP.ENABLED = False
        if frozen:
            cfg.freeze()
        return True
    return False


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with pvt_d2's optimizer, evaluators, checkpointer and CPU support."""

    def __init__(self, cfg):
        prepare_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(d2_defaults, "create_ddp_model", create_ddp_model))
            stack.enter_context(mock.patch.object(d2_defaults, "DetectionCheckpointer", AtomicCheckpointer))
            super().__init__(cfg)

    def train(self):
        """Train, and return the last evaluation results (``{dataset: {task: metrics}}``) or None."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MODEL.PVT_D2.PRETRAINED:
            from ..checkpoint import load_pretrained_backbone

            load_pretrained_backbone(model, cfg.MODEL.PVT_D2.PRETRAINED)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return DatasetEvaluators([COCOEvaluator(dataset_name, tasks=tasks, distributed=True,
                                                output_dir=output_folder)])
