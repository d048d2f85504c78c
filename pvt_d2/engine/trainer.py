"""The detectron2 trainer used by ``tools/train_net.py``.

On top of detectron2's ``DefaultTrainer`` it adds the AdamW recipe
(:mod:`.optim`), COCO evaluators for box (and mask) models, atomic
checkpoints (:mod:`.checkpoint`) and multi-process training on CPU (gloo).
The ImageNet backbone weights (``MODEL.PVT_D2.PRETRAINED``) are loaded by the
backbone builder itself, for every client that builds the model.

Reliability: data loaders use :class:`~pvt_d2.data.mapper.RobustDatasetMapper`
(a bad image is skipped in training, named in evaluation); datasets that are
empty, malformed or have more classes than the model raise
:class:`~pvt_d2.data.DatasetError` before training starts; a loss that becomes
NaN/Inf stops the run with :class:`NonFiniteLossError`, a one-paragraph message
naming the iteration and the loss terms.
"""
import logging
import math
import os
import weakref

import numpy as np
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model as d2_create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AtomicCheckpointer, run_info_from_config
from ..data import (DatasetError, check_datasets_for_config, check_num_classes, load_dataset_dicts,
                    prepare_datasets)
from ..data.mapper import MAX_CONSECUTIVE_FAILURES, RobustDatasetMapper
from .optim import build_optimizer
from .run import (LossNotFiniteOnSomeProcess, NonFiniteLossError, apply_config_after_resume, changed_settings,
                  divergence_reported, log_resume_changes, snapshot_hyperparameters, track_training)

__all__ = ["Trainer", "RecipeMixin", "NonFiniteLossError", "create_ddp_model", "use_cpu_if_no_cuda"]

logger = logging.getLogger("pvt_d2")


def create_ddp_model(model, *, fp16_compression: bool = False, **kwargs):
    """detectron2's ``create_ddp_model`` that also works for CPU modules.

    detectron2 passes ``device_ids=[local_rank]``, which DistributedDataParallel
    rejects for a module on the CPU; for those no ``device_ids`` is given.
    """
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, fp16_compression=fp16_compression, **kwargs)


def use_cpu_if_no_cuda(cfg) -> str:
    """Run on the CPU without AMP when the config or the machine says so; returns the log line ('' if unchanged).

    A CUDA config on a machine without CUDA is switched to the CPU; on the CPU
    (``MODEL.DEVICE cpu``, as detectron2's docs tell CPU users to add, or the
    switch just made) ``SOLVER.AMP.ENABLED`` is turned off, since detectron2's
    AMP trainer needs CUDA. Every training and evaluation entry point calls
    this and logs the returned line once.
    """
    notes = []
    frozen = cfg.is_frozen()
    cfg.defrost()
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
        notes.append("CUDA is not available: running on the CPU (MODEL.DEVICE=cpu)")
    if not cfg.MODEL.DEVICE.startswith("cuda") and cfg.SOLVER.AMP.ENABLED:
        cfg.SOLVER.AMP.ENABLED = False
        notes.append("with AMP off" if notes else
                     f"MODEL.DEVICE is {cfg.MODEL.DEVICE}: AMP (SOLVER.AMP.ENABLED) needs CUDA, so it is off")
    if frozen:
        cfg.freeze()
    return " ".join(notes) + "." if notes else ""


class _LossCheckOnAllProcesses:
    """Step-trainer mixin: a NaN/Inf loss on any process stops all processes at the same iteration.

    detectron2 checks the loss on the first process only (in
    ``_write_metrics``); the others would go on to the next iteration and wait
    in a collective for a process that has stopped. With several processes,
    every process here compares all processes' losses each iteration before
    detectron2 writes the metrics, and raises at the same point, so a
    multi-process run ends cleanly.
    """

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        if comm.get_world_size() > 1:
            local = {k: float(v.detach().float().cpu().item()) for k, v in loss_dict.items()}
            everyone = comm.all_gather(local)
            if not all(math.isfinite(v) for losses in everyone for v in losses.values()):
                mean = {k: float(np.mean([losses[k] for losses in everyone])) for k in local}
                raise LossNotFiniteOnSomeProcess(
                    f"Loss became infinite or NaN at iteration={self.iter if iter is None else iter}!\n"
                    f"loss_dict = {mean}")
        return super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)


class CheckedSimpleTrainer(_LossCheckOnAllProcesses, SimpleTrainer):
    """detectron2's ``SimpleTrainer`` with the loss checked on all processes."""


class CheckedAMPTrainer(_LossCheckOnAllProcesses, AMPTrainer):
    """detectron2's ``AMPTrainer`` with the loss checked on all processes."""


class RecipeMixin:
    """pvt_d2's recipe for any detectron2 ``DefaultTrainer`` subclass: ``class MyTrainer(RecipeMixin, DefaultTrainer)``.

    Gives the trainer what a pvt_d2 config asks for beyond detectron2's
    defaults: the optimizer of ``SOLVER.OPTIMIZER`` (AdamW with the papers'
    weight-decay exemptions; detectron2 builds SGD), the training
    augmentation of ``INPUT.AUGMENTATION`` with the robust dataset mapper, and
    COCO evaluators. The model itself, ImageNet weights included, is the same
    with or without it (the backbone builder loads them).
    """

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader, with :class:`RobustDatasetMapper` and clear dataset errors."""
        dataset = load_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_num_classes(cfg, cfg.DATASETS.TRAIN, training=True)
        # a dataset smaller than the failure limit is broken once each of its images failed (detectron2's
        # MapDataset has no other image left to try then)
        mapper = RobustDatasetMapper(cfg, True, max_consecutive_failures=max(1, min(MAX_CONSECUTIVE_FAILURES,
                                                                                      len(dataset))))
        return build_detection_train_loader(cfg, dataset=dataset, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, with :class:`RobustDatasetMapper` and clear dataset errors."""
        proposal_files = None
        if cfg.MODEL.LOAD_PROPOSALS:
            proposal_files = [cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]]
        dataset = load_dataset_dicts([dataset_name], filter_empty=False, proposal_files=proposal_files)
        return build_detection_test_loader(dataset, mapper=RobustDatasetMapper(cfg, False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """The optimizer of ``SOLVER.OPTIMIZER`` (:func:`~pvt_d2.engine.optim.build_optimizer`)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return DatasetEvaluators([COCOEvaluator(dataset_name, tasks=tasks, distributed=True,
                                                output_dir=output_folder)])


class Trainer(RecipeMixin, DefaultTrainer):
    """``DefaultTrainer`` with pvt_d2's optimizer, evaluators, checkpointer, robust data and CPU support.

    The parts are assembled explicitly, in detectron2's order (model,
    optimizer, data loader, DDP wrapper, step trainer, scheduler,
    checkpointer, hooks), as detectron2's ``tools/lazyconfig_train_net.py``
    does; the pieces that differ from ``DefaultTrainer`` are
    :func:`create_ddp_model` (CPU processes), :class:`CheckedSimpleTrainer` /
    :class:`CheckedAMPTrainer` (loss checked on every process) and
    :class:`~pvt_d2.checkpoint.AtomicCheckpointer`. Every other method
    (``build_hooks``, ``test``, ``resume_or_load``, ...) is detectron2's.
    """

    def __init__(self, cfg):
        prepare_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        if not cfg.DATASETS.TRAIN:
            raise DatasetError("DATASETS.TRAIN is empty: name at least one dataset to train on.")
        # refuse a class-count mismatch now, not hours later (evaluation runs at the end of training);
        # training sets whose classes are known only once loaded are checked in build_train_loader
        # annotation files are checked (json, ids, sizes, boxes, polygons, masks vs MODEL.MASK_ON) before
        # anything is built: pvt_d2/data/validation.py
        check_datasets_for_config(cfg, cfg.DATASETS.TRAIN)
        check_num_classes(cfg, cfg.DATASETS.TRAIN, training=True)
        check_num_classes(cfg, cfg.DATASETS.TEST, training=False, load_missing=True)
        self._step_failed = False
        TrainerBase.__init__(self)  # DefaultTrainer.__init__'s work is done below, with pvt_d2's parts
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        # detectron2's AMP trainer needs CUDA: a CPU model trains in float32 (use_cpu_if_no_cuda logs it)
        amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE.startswith("cuda")
        step_cls = CheckedAMPTrainer if amp else CheckedSimpleTrainer
        self._trainer = step_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_checkpointer(cls, cfg, model, *, strict: bool = False, **checkpointables) -> AtomicCheckpointer:
        """The checkpointer of a run: :class:`~pvt_d2.checkpoint.AtomicCheckpointer` in ``OUTPUT_DIR``,
        recording (and checking on load) :func:`~pvt_d2.checkpoint.run_info_from_config`."""
        return AtomicCheckpointer(model, cfg.OUTPUT_DIR, strict=strict, run_info=run_info_from_config(cfg),
                                  **checkpointables)

    def resume_or_load(self, resume: bool = True):
        """detectron2's ``resume_or_load``; on a resume the new config's learning rate, weight decay and
        schedule are applied at the checkpoint's iteration, and each changed setting is logged (old -> new).

        detectron2 would restore the optimizer's and the scheduler's state from
        the checkpoint, silently keeping the old learning rate: the advice of
        the divergence message (lower ``SOLVER.BASE_LR``, ``--resume``) would
        not work.
        """
        snapshot = snapshot_hyperparameters(self.optimizer)
        super().resume_or_load(resume=resume)
        if resume and self.start_iter > 0:
            apply_config_after_resume(self.optimizer, snapshot, self.scheduler)
            log_resume_changes(changed_settings(self.checkpointer.loaded_run_info.get("settings"),
                                                run_info_from_config(self.cfg)["settings"]), self.start_iter)

    def train(self):
        """Train, and return the last evaluation results (``{dataset: {task: metrics}}``) or None.

        Raises:
            NonFiniteLossError: the loss or the predictions became NaN/Inf.
        """
        track_training(self)
        with divergence_reported(self, self.checkpointer, self._divergence_settings, "SOLVER.BASE_LR",
                                 "SOLVER.CLIP_GRADIENTS"):
            super().train()
        return getattr(self, "_last_eval_results", None)

    def _divergence_settings(self):
        s = self.cfg.SOLVER
        return [("SOLVER.BASE_LR", float(s.BASE_LR)), ("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH),
                ("SOLVER.WARMUP_ITERS", s.WARMUP_ITERS), ("SOLVER.AMP.ENABLED", s.AMP.ENABLED)]

    def run_step(self):
        try:
            super().run_step()
        except BaseException:
            self._step_failed = True
            raise

    def after_train(self):
        if self._step_failed:
            # a failed last iteration must not be mistaken for the end of training (final evaluation)
            self._hooks = [h for h in self._hooks if not isinstance(h, hooks.EvalHook)]
        super().after_train()
