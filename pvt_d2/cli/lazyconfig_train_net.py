"""Train or evaluate a pvt_d2 detector from a LazyConfig file (``configs/lazy/*.py``).

    pvt-d2-lazy-train --config-file configs/lazy/retinanet_pvt_v2_b0.py
    pvt-d2-lazy-train --config-file configs/lazy/mask_rcnn_pvt_v2_b2.py --num-gpus 8 \\
        train.max_iter=1000 optimizer.lr=1e-4
    pvt-d2-lazy-train --config-file CFG.py --eval-only train.init_checkpoint=model_final.pth
    pvt-d2-lazy-train --config-file configs/lazy/faster_rcnn_pvt_v2_b0.py \\
        --dataset trees_train=ann/train.json:images --dataset trees_val=ann/val.json:images \\
        "dataloader.train.dataset.names=[trees_train]" dataloader.test.dataset.names=trees_val

The structure follows detectron2's ``pvt-d2-lazy-train`` (the
sections ``model``, ``dataloader``, ``optimizer``, ``lr_multiplier``,
``train``); the reliability of ``pvt-d2-train`` is kept: atomic
checkpoints, the safe checkpoint reader, robust data loading, CPU fallback,
``--dataset NAME=SPEC`` (the number of classes taken from the training set),
the annotation files checked before training (``pvt_d2/data/validation.py``),
the ``train.output_dir`` checks and lock (another run's checkpoints are kept
unless ``--resume`` / ``--overwrite``; a live run's folder is refused), and one
``ERROR:`` line with exit status 2 for a problem the user can fix.

With the same seed (``train.seed``) and thread count, the quickstart twin
``configs/lazy/quickstart_pvt_v2_b0.py`` trains exactly as ``pvt-d2-quickstart``:
the same initial weights, image order and augmentations, parameter groups and
schedule (``tests/test_lazyconfig.py``).

A LazyConfig file is Python code and runs when loaded: this script loads only
the ``--config-file`` you name (your own code, or pvt_d2's ``configs/lazy``);
YAML files are refused here (use ``pvt-d2-train``, which parses them safely).
"""
import contextlib
import logging
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (AMPTrainer, SimpleTrainer, default_argument_parser, default_setup,
                               default_writers, hooks, launch)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from hydra.errors import OverrideParseException
from omegaconf.errors import OmegaConfBaseException

from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError
from pvt_d2.config import ConfigError
from pvt_d2.data import BadImageError, DatasetError, DatasetNotFoundError, prepare_datasets
from pvt_d2.engine.output_dir import OutputDirError, OutputDirLock, check_output_dir
from pvt_d2.engine.trainer import NonFiniteLossError, create_ddp_model
from pvt_d2.lazy import (check_lazy_datasets, check_lazy_num_classes, dataset_names, setup_lazy_datasets,
                         skip_imagenet_weights)

USER_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, BadImageError, CheckpointError, NonFiniteLossError,
               OutputDirError)
logger = logging.getLogger("pvt_d2")


def load_lazy_config(path: str, overrides):
    """Load the LazyConfig file ``path`` (Python, run as the user's code) and apply ``key=value`` overrides.

    Raises:
        ConfigError: a missing file, a file that is not ``.py``, an error while running it, a bad override.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path}")
    if not path.endswith(".py"):
        raise ConfigError(f"{path} is not a LazyConfig .py file; YAML configs are trained with pvt-d2-train.")
    try:
        cfg = LazyConfig.load(path)
    except (ConfigError, DatasetError) as e:
        raise ConfigError(f"LazyConfig {path}: {e}") from None
    except Exception as e:  # the file is the user's Python code: report what it raised, in one line
        raise ConfigError(f"LazyConfig {path} failed to load: {type(e).__name__}: {e}") from None
    missing = [k for k in ("model", "dataloader", "optimizer", "lr_multiplier", "train") if k not in cfg]
    if missing:
        raise ConfigError(f"LazyConfig {path} lacks the section(s) {', '.join(missing)}.")
    try:
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    except (OmegaConfBaseException, KeyError, ValueError, OverrideParseException) as e:
        raise ConfigError(f"Bad override in {list(overrides)}: {e}") from None
    if str(cfg.train.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
        cfg.train.amp.enabled = False
    return cfg


def _dataset_names(cfg, training: bool):
    names = dataset_names(cfg.dataloader.train.dataset.names) if training else []
    return names + dataset_names(cfg.dataloader.test.dataset.names)


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def build_training(cfg):
    """``(model, optimizer, train_loader)`` of a LazyConfig, built in ``pvt-d2-quickstart``'s order.

    Model (the backbone loads its ImageNet weights, ``pretrained``, unless
    ``train.init_checkpoint`` names a whole detector), optimizer, data loader:
    the order in which detectron2's ``DefaultTrainer`` (and pvt_d2's
    ``Trainer``) draws from the random generators, so the same seed gives the
    same initial weights and the same image order and augmentations.
    """
    if cfg.train.init_checkpoint:  # its weights replace the ImageNet ones: these are not fetched
        skip_imagenet_weights(cfg.model)
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    return model, optim, train_loader


def do_train(args, cfg):
    model, optim, train_loader = build_training(cfg)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    last_eval = {}

    def evaluate():
        last_eval.update(do_test(cfg, model))
        return last_eval

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:
        raise NonFiniteLossError(f"Training diverged: {str(e).splitlines()[0]}. Lower optimizer.lr or lengthen "
                                 f"the warmup, then start again (--resume continues from the last checkpoint).") from e
    return last_eval


def setup(args):
    """The LazyConfig of ``args`` with its ``--dataset`` declarations, seeded and logged (``default_setup``)."""
    cfg = load_lazy_config(args.config_file, args.opts)
    setup_lazy_datasets(cfg, args.dataset, args.opts)
    default_setup(cfg, args)
    prepare_datasets(_dataset_names(cfg, training=not args.eval_only))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        skip_imagenet_weights(cfg.model)  # train.init_checkpoint replaces them
        model = instantiate(cfg.model).to(cfg.train.device)
        model = create_ddp_model(model)
        AtomicCheckpointer(model, strict=True).resume_or_load(cfg.train.init_checkpoint, resume=False)
        return do_test(cfg, model)
    return do_train(args, cfg)


def _worker(args):
    try:
        return main(args)
    except USER_ERRORS as e:
        if comm.get_rank() == 0:
            print(f"ERROR: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def get_parser():
    """detectron2's arguments plus ``--dataset NAME=SPEC`` and ``--overwrite``, as in ``pvt-d2-train``."""
    parser = default_argument_parser()
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                        help="declare a dataset (repeatable): NAME=annotations.json:images (COCO json) or "
                             "NAME=VOCfolder[:SPLIT] (Pascal VOC); name it in dataloader.train.dataset.names / "
                             "dataloader.test.dataset.names. The number of classes is taken from the training set.")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in a train.output_dir that holds another run's checkpoints, "
                             "replacing them (without it, such a folder is refused unless --resume)")
    return parser


def check_args(args):
    """Check the config, ``train.output_dir`` and the datasets once, before any worker process is started.

    The datasets are registered, and their annotation files and class counts
    checked against the model as ``pvt-d2-train`` does
    (:func:`pvt_d2.lazy.check_lazy_datasets`, :func:`pvt_d2.lazy.check_lazy_num_classes`).
    """
    cfg = load_lazy_config(args.config_file, args.opts)
    setup_lazy_datasets(cfg, args.dataset, args.opts)
    if not args.eval_only:
        check_output_dir(cfg.train.output_dir, resume=args.resume, overwrite=args.overwrite)
    prepare_datasets(_dataset_names(cfg, training=not args.eval_only))
    check_lazy_datasets(cfg, training=not args.eval_only)
    check_lazy_num_classes(cfg, training=not args.eval_only)
    return cfg


def cli(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        cfg = check_args(args)
        with OutputDirLock(cfg.train.output_dir, "evaluation" if args.eval_only else "training") \
                if args.machine_rank == 0 else contextlib.nullcontext():
            if args.num_gpus * args.num_machines > 1:
                launch(_worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                       dist_url=args.dist_url, args=(args,))
            else:
                main(args)
    except USER_ERRORS as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    except torch.multiprocessing.ProcessExitedException as e:
        if e.exit_code == 2:
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(cli())
