"""Train or evaluate a pvt_d2 detector (RetinaNet, Mask R-CNN, Cascade Mask R-CNN).

    pvt-d2-train --config-file configs/retinanet_pvt_s.yaml
    pvt-d2-train --config-file configs/mask_rcnn_pvt_v2_b2.yaml --num-gpus 8
    pvt-d2-train --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    pvt-d2-train --config-file CFG --resume          # continue from last_checkpoint

``--num-gpus N`` starts N processes per machine: one per GPU, or N CPU
processes (gloo) on a machine without CUDA. Without CUDA the run switches to
the CPU with AMP off and says so in the log.

Problems the user can fix (a bad config value, a missing or unusable dataset,
an unreadable image in evaluation, a missing or mismatched checkpoint, a
diverged loss) end the command with exit status 2 and one ``ERROR:`` paragraph
on stderr instead of a traceback; the config is checked before any worker
process starts.
"""
import contextlib
import logging
import sys
import time

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger
from torch.multiprocessing import ProcessExitedException

from pvt_d2.config import ConfigError, load_config, resolve_config_file
from pvt_d2.data import (BadImageError, DatasetError, DatasetNotFoundError, check_num_classes,
                         prepare_datasets)
from pvt_d2.data.custom import setup_custom_datasets
from pvt_d2.engine import Trainer, use_cpu_if_no_cuda
from pvt_d2.engine.output_dir import OutputDirError, OutputDirLock, check_output_dir
from pvt_d2.checkpoint import CheckpointError
from pvt_d2.checkpoint.download import prefetch_pretrained
from pvt_d2.engine.trainer import NonFiniteLossError
from pvt_d2.utils.precision import autocast_backbone

# Errors whose message tells the user what to fix: reported without a traceback, exit status 2.
USER_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, BadImageError, CheckpointError, NonFiniteLossError,
               OutputDirError)
# Those that every process of a multi-process run meets at the same point: the first process reports them.
SHARED_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, CheckpointError)
# How long the other processes wait before exiting on such an error.
QUIET_EXIT_DELAY_S = 5


def setup(args):
    """Config from file and overrides, CPU fallback, logging and the dataset check."""
    args.config_file = resolve_config_file(args.config_file)
    cfg = load_config(args.config_file, args.opts)
    setup_custom_datasets(cfg, args.dataset, args.opts, require_used=True)
    on_cpu = use_cpu_if_no_cuda(cfg)
    if args.eval_only and cfg.MODEL.WEIGHTS:
        cfg.MODEL.PVT_D2.PRETRAINED = ""  # MODEL.WEIGHTS replaces the ImageNet weights: do not fetch them
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pvt_d2")
    if on_cpu:
        logging.getLogger("pvt_d2").info("CUDA is not available: running on the CPU (MODEL.DEVICE=cpu) with AMP off.")
    names = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    prepare_datasets(names)
    prefetch_pretrained(cfg)  # a URL: downloaded once, or one ERROR before any model is built
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_num_classes(cfg, cfg.DATASETS.TEST, training=False, load_missing=True)
        model = Trainer.build_model(cfg)
        checkpointer = Trainer.build_checkpointer(cfg, model, strict=True)
        if not cfg.MODEL.WEIGHTS and not (args.resume and checkpointer.has_checkpoint()):
            raise CheckpointError("--eval-only needs trained weights: MODEL.WEIGHTS is empty (and there is no "
                                  "checkpoint to --resume from in OUTPUT_DIR), so it would evaluate a randomly "
                                  "initialised model. Pass MODEL.WEIGHTS path/to/model_final.pth.")
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        autocast_backbone(model, args.amp)  # --amp: backbone under autocast; heads, post-processing in fp32
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _report(error: Exception, rank: int = 0) -> None:
    print(f"ERROR{f' (process {rank})' if rank else ''}: {error}", file=sys.stderr, flush=True)


def worker(args):
    """``main`` in a worker process of a multi-process run: a user error ends the process with status 2.

    The error is printed once (by the first process when all processes meet
    it, otherwise by the process that did); ``launch`` then stops the others.
    """
    try:
        return main(args)
    except USER_ERRORS as e:
        shared = isinstance(e, SHARED_ERRORS) or getattr(e, "all_processes", False)
        if comm.get_rank() == 0 or not shared:
            _report(e, comm.get_rank())
        else:
            time.sleep(QUIET_EXIT_DELAY_S)  # launch stops everyone when one exits: let the first one report
        sys.exit(2)


def check_args(args) -> None:
    """Check the config, the process layout and the datasets once, before any worker process is started."""
    cfg = load_config(args.config_file, args.opts)
    setup_custom_datasets(cfg, args.dataset, args.opts, require_used=True)
    world_size = args.num_gpus * args.num_machines
    if args.amp != "fp32" and not args.eval_only:
        raise ConfigError(f"--amp {args.amp} applies to --eval-only; training uses SOLVER.AMP.ENABLED (on GPUs)")
    if not args.eval_only and cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ConfigError(f"SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH} must be a multiple of the number of "
                          f"processes ({world_size} = --num-gpus x --num-machines) so that each gets the same "
                          f"number of images.")
    prepare_datasets(([] if args.eval_only else list(cfg.DATASETS.TRAIN)) + list(cfg.DATASETS.TEST))
    if not args.eval_only:
        check_output_dir(cfg.OUTPUT_DIR, resume=args.resume, overwrite=args.overwrite)
    return cfg


def get_parser():
    """detectron2's training arguments plus ``--dataset NAME=SPEC`` (your own COCO json or VOC folder)."""
    parser = default_argument_parser()
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                        help="declare a dataset (repeatable): NAME=annotations.json:images (COCO json) or "
                             "NAME=VOCfolder[:SPLIT] (Pascal VOC); name it in DATASETS.TRAIN / DATASETS.TEST. "
                             "The number of classes is taken from the training set.")
    parser.add_argument("--amp", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="with --eval-only: run the backbone under autocast in this precision (heads and "
                             "post-processing stay fp32); bf16 needs a CPU with AVX512-BF16/AMX or a GPU, else "
                             "falls back to fp32 with a warning (default fp32)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an OUTPUT_DIR that holds another run's checkpoints, replacing "
                             "them (without it, such a folder is refused unless --resume)")
    return parser


def cli(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        cfg = check_args(args)
        with OutputDirLock(cfg.OUTPUT_DIR, "evaluation" if args.eval_only else "training") \
                if args.machine_rank == 0 else contextlib.nullcontext():
            if args.num_gpus * args.num_machines > 1:
                launch(worker, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                       dist_url=args.dist_url, args=(args,))
            else:
                main(args)
    except USER_ERRORS as e:
        _report(e)
        return 2
    except ProcessExitedException as e:
        if e.exit_code == 2:  # a worker stopped on a user error and has printed it
            return 2
        raise
    return 0


def evaluate_cli(argv=None) -> int:
    """``pvt-d2-evaluate``: ``pvt-d2-train --eval-only`` (COCO evaluation of ``MODEL.WEIGHTS``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli(["--eval-only"] + [a for a in argv if a != "--eval-only"])
