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

The safeguards of ``pvt-d2-train`` come from the same code
(:mod:`pvt_d2.engine.run`): ``--eval-only`` without ``train.init_checkpoint``
is refused; the evaluator writes under ``train.output_dir``; an override of a
key the config lacks is refused naming the closest valid key; SIGINT /
SIGTERM end the run with one line naming the last checkpoint (exit 130 /
143); a diverged loss is one paragraph; ``--resume`` applies the new
``optimizer.lr`` / schedule at the checkpoint's iteration; on the CPU AMP is
off, with one log line.

With the same seed (``train.seed``) and thread count, the quickstart twin
``configs/lazy/quickstart_pvt_v2_b0.py`` trains exactly as ``pvt-d2-quickstart``:
the same initial weights, image order and augmentations, parameter groups and
schedule (``tests/test_lazyconfig.py``).

A LazyConfig file is Python code and runs when loaded: this script loads only
the ``--config-file`` you name (your own code, or pvt_d2's ``configs/lazy``);
YAML files are refused here (use ``pvt-d2-train``, which parses them safely).
"""
import difflib
import inspect
import logging
import os
import sys

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from hydra.errors import OverrideParseException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from pvt_d2.checkpoint import AtomicCheckpointer, CheckpointError
from pvt_d2.config import ConfigError
from pvt_d2.data import BadImageError, DatasetError, DatasetNotFoundError, prepare_datasets
from pvt_d2.engine.output_dir import OutputDirError, check_output_dir
from pvt_d2.engine.run import (NonFiniteLossError, apply_config_after_resume, changed_settings, divergence_reported,
                               log_resume_changes, refuse_eval_without_weights, run_command, run_worker,
                               snapshot_hyperparameters, track_training)
from pvt_d2.engine.trainer import CheckedAMPTrainer, CheckedSimpleTrainer, create_ddp_model
from pvt_d2.lazy import (check_lazy_datasets, check_lazy_num_classes, dataset_names, setup_lazy_datasets,
                         skip_imagenet_weights)

USER_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, BadImageError, CheckpointError, NonFiniteLossError,
               OutputDirError)
# Those that every process of a multi-process run meets at the same point: the first process reports them.
SHARED_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, CheckpointError)
logger = logging.getLogger("pvt_d2")


# --------------------------------------------------------------------------- overrides of keys that exist


def _override_key(override: str) -> str:
    """The dotted key of a hydra override (``a.b=1``, ``+a.b=1``, ``~a.b``); '' if it adds a key (``+``)."""
    key = override.split("=", 1)[0].strip()
    if key.startswith("+"):
        return ""  # "+key=value" adds a key on purpose
    return key.lstrip("~")


def _all_keys(node, prefix: str = ""):
    """Every dotted key of a LazyConfig (interpolations left unresolved)."""
    if isinstance(node, DictConfig):
        for k in node.keys():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path
            yield from _all_keys(node._get_node(k), path)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _all_keys(node._get_node(i), f"{prefix}.{i}")


def _accepts(target, name: str) -> bool:
    """Whether the callable of a ``L(...)`` node takes an argument ``name`` (a key it does not list yet)."""
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:  # unknown target: cannot tell, let instantiate report it
            return True
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_override_keys(cfg, overrides) -> None:
    """Refuse an override whose key the config lacks, naming the closest valid key.

    detectron2 would add the misspelled key silently (``train.max_iters=2``
    trains the whole schedule). A key a lazy call (``L(f)(...)``) does not list
    yet is accepted when ``f`` takes that argument.

    Raises:
        ConfigError: naming the override and, if any, the closest existing key.
    """
    keys = None
    for override in overrides:
        key = _override_key(override)
        if not key:
            continue
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            child = None
            if isinstance(node, DictConfig) and part in node:
                child = node._get_node(part)
            elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
                child = node._get_node(int(part))
            if child is None:
                if isinstance(node, DictConfig) and "_target_" in node and depth == len(parts) - 1 \
                        and _accepts(node._get_node("_target_")._value(), part):
                    break
                keys = keys if keys is not None else list(_all_keys(cfg))
                close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]}?" if close else " (prefix it with + to add a new key)"
                raise ConfigError(f"Unknown config key {key} in the override '{override}': the LazyConfig has no "
                                  f"{'.'.join(parts[:depth + 1])}{hint}")
            node = child


def load_lazy_config(path: str, overrides):
    """Load the LazyConfig file ``path`` (Python, run as the user's code) and apply ``key=value`` overrides.

    Raises:
        ConfigError: a missing file, a file that is not ``.py``, an error while running it, a bad override or
            one naming a key the config lacks.
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
    check_override_keys(cfg, [o for o in overrides if "=" in o or o.startswith("~")])
    try:
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    except (OmegaConfBaseException, KeyError, ValueError, OverrideParseException) as e:
        raise ConfigError(f"Bad override in {list(overrides)}: {e}") from None
    except NotImplementedError as e:  # detectron2: "deletion is not yet a supported override" (~key)
        raise ConfigError(f"Bad override in {list(overrides)}: {e}; set the key to null instead (key=null).") \
            from None
    _outputs_under_output_dir(cfg, overrides)
    cfg.train["_device_note"] = use_cpu_if_no_cuda_lazy(cfg)  # logged once by setup(), once logging is set up
    return cfg


def _outputs_under_output_dir(cfg, overrides) -> None:
    """The evaluator writes its predictions under ``train.output_dir`` (unless overridden explicitly)."""
    evaluator = cfg.dataloader.get("evaluator")
    if isinstance(evaluator, DictConfig) and "output_dir" in evaluator and \
            not any(_override_key(o).startswith("dataloader.evaluator.output_dir") for o in overrides):
        evaluator.output_dir = os.path.join(str(cfg.train.output_dir), "inference")


def use_cpu_if_no_cuda_lazy(cfg) -> str:
    """:func:`pvt_d2.engine.use_cpu_if_no_cuda` for a LazyConfig (``train.device``, ``train.amp.enabled``)."""
    notes = []
    if str(cfg.train.get("device", "cpu")).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
        notes.append("CUDA is not available: running on the CPU (train.device=cpu)")
    amp = cfg.train.get("amp")
    if not str(cfg.train.get("device", "cpu")).startswith("cuda") and amp is not None and amp.get("enabled"):
        cfg.train.amp.enabled = False
        notes.append("with AMP off" if notes else
                     f"train.device is {cfg.train.get('device', 'cpu')}: AMP (train.amp.enabled) needs CUDA, "
                     f"so it is off")
    return " ".join(notes) + "." if notes else ""


def _dataset_names(cfg, training: bool):
    names = dataset_names(cfg.dataloader.train.dataset.names) if training else []
    return names + dataset_names(cfg.dataloader.test.dataset.names)


# --------------------------------------------------------------------------- what a checkpoint records


def _target_name(node) -> str:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target is None:
        return ""
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def lazy_run_info(cfg) -> dict:
    """The run info a LazyConfig run's checkpoints record (as :func:`pvt_d2.checkpoint.run_info_from_config`):
    optimizer, schedule length and the settings a resume compares."""
    settings = {}
    for key in ("lr", "weight_decay", "momentum"):
        value = cfg.optimizer.get(key)
        if isinstance(value, (int, float)):
            settings[f"optimizer.{key}"] = value
    settings["train.max_iter"] = int(cfg.train.max_iter)
    batch = cfg.dataloader.train.get("total_batch_size")
    if isinstance(batch, int):
        settings["dataloader.train.total_batch_size"] = batch
    info = {"max_iter": int(cfg.train.max_iter), "settings": settings}
    if _target_name(cfg.optimizer):
        info["optimizer"] = _target_name(cfg.optimizer).rsplit(".", 1)[-1]
    return info


# --------------------------------------------------------------------------- training and evaluation


def do_test(cfg, model):
    """Evaluate ``model`` with ``dataloader.evaluator`` (none, or ``dataloader.evaluator=null``: no evaluation)."""
    if cfg.dataloader.get("evaluator") is None:
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


def _divergence_settings(cfg):
    def settings():
        shown = [("optimizer.lr", cfg.optimizer.get("lr"))]
        if cfg.dataloader.train.get("total_batch_size") is not None:
            shown.append(("dataloader.train.total_batch_size", cfg.dataloader.train.total_batch_size))
        shown.append(("train.amp.enabled", bool(cfg.train.amp.enabled)))
        return shown
    return settings


def do_train(args, cfg):
    model, optim, train_loader = build_training(cfg)
    model = create_ddp_model(model, **cfg.train.ddp)
    amp = cfg.train.amp.enabled and str(cfg.train.device).startswith("cuda")
    trainer = (CheckedAMPTrainer if amp else CheckedSimpleTrainer)(model, train_loader, optim)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer, run_info=lazy_run_info(cfg))
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
    snapshot = snapshot_hyperparameters(optim)
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    resumed = args.resume and checkpointer.has_checkpoint()
    start_iter = trainer.iter + 1 if resumed else 0
    if resumed:  # the LRScheduler hook builds the schedule from initial_lr at start_iter
        apply_config_after_resume(optim, snapshot)
        log_resume_changes(changed_settings(checkpointer.loaded_run_info.get("settings"),
                                            lazy_run_info(cfg)["settings"]), start_iter)
    track_training(trainer)
    with divergence_reported(trainer, checkpointer, _divergence_settings(cfg), "optimizer.lr", "gradient clipping"):
        trainer.train(start_iter, cfg.train.max_iter)
    return last_eval


def setup(args):
    """The LazyConfig of ``args`` with its ``--dataset`` declarations, seeded and logged (``default_setup``)."""
    cfg = load_lazy_config(args.config_file, args.opts)
    setup_lazy_datasets(cfg, args.dataset, args.opts)
    note = cfg.train.pop("_device_note", "")
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="pvt_d2")
    if note:
        logger.info(note)
    prepare_datasets(_dataset_names(cfg, training=not args.eval_only))
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        skip_imagenet_weights(cfg.model)  # train.init_checkpoint replaces them
        model = instantiate(cfg.model).to(cfg.train.device)
        model = create_ddp_model(model)
        checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, strict=True, run_info=lazy_run_info(cfg))
        refuse_eval_without_weights(cfg.train.init_checkpoint, can_resume=args.resume and checkpointer.has_checkpoint(),
                                    key="train.init_checkpoint")
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
        return do_test(cfg, model)
    return do_train(args, cfg)


def _worker(args):
    """``main`` in a worker process of a multi-process run (:func:`pvt_d2.engine.run.run_worker`)."""
    return run_worker(main, args, USER_ERRORS, SHARED_ERRORS)


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
    world_size = args.num_gpus * args.num_machines
    batch = cfg.dataloader.train.get("total_batch_size")
    if not args.eval_only and world_size and isinstance(batch, int) and batch % world_size:
        raise ConfigError(f"dataloader.train.total_batch_size = {batch} must be a multiple of the number of "
                          f"processes ({world_size} = --num-gpus x --num-machines) so that each gets the same "
                          f"number of images.")
    if not args.eval_only:
        check_output_dir(cfg.train.output_dir, resume=args.resume, overwrite=args.overwrite)
    prepare_datasets(_dataset_names(cfg, training=not args.eval_only))
    check_lazy_datasets(cfg, training=not args.eval_only)
    check_lazy_num_classes(cfg, training=not args.eval_only)
    return cfg


def cli(argv=None) -> int:
    """Parse ``argv`` and run (:func:`pvt_d2.engine.run.run_command`, shared with ``pvt-d2-train``)."""
    args = get_parser().parse_args(argv)
    return run_command(args, check_args, main, _worker, lambda cfg: cfg.train.output_dir, USER_ERRORS)


if __name__ == "__main__":
    sys.exit(cli())
