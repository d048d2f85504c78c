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
import logging
import sys

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from pvt_d2.config import ConfigError, load_config, resolve_config_file
from pvt_d2.data import (BadImageError, DatasetError, DatasetNotFoundError, check_num_classes,
                         prepare_datasets)
from pvt_d2.data.custom import setup_custom_datasets
from pvt_d2.engine import Trainer, use_cpu_if_no_cuda
from pvt_d2.engine.output_dir import OutputDirError, check_output_dir
from pvt_d2.engine.run import NonFiniteLossError, refuse_eval_without_weights, run_command, run_worker
from pvt_d2.checkpoint import CheckpointError
from pvt_d2.checkpoint.download import prefetch_pretrained
from pvt_d2.utils.precision import autocast_backbone

# Errors whose message tells the user what to fix: reported without a traceback, exit status 2.
USER_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, BadImageError, CheckpointError, NonFiniteLossError,
               OutputDirError)
# Those that every process of a multi-process run meets at the same point: the first process reports them.
SHARED_ERRORS = (ConfigError, DatasetNotFoundError, DatasetError, CheckpointError)


def setup(args):
    """Config from file and overrides, CPU fallback, logging and the dataset check."""
    args.config_file = resolve_config_file(args.config_file)
    cfg = load_config(args.config_file, args.opts)
    setup_custom_datasets(cfg, args.dataset, args.opts, require_used=True)
    device_note = use_cpu_if_no_cuda(cfg)
    if args.eval_only and cfg.MODEL.WEIGHTS:
        cfg.MODEL.PVT_D2.PRETRAINED = ""  # MODEL.WEIGHTS replaces the ImageNet weights: do not fetch them
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pvt_d2")
    if device_note:
        logging.getLogger("pvt_d2").info(device_note)
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
        refuse_eval_without_weights(cfg.MODEL.WEIGHTS, can_resume=args.resume and checkpointer.has_checkpoint(),
                                    key="MODEL.WEIGHTS")
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        autocast_backbone(model, args.amp)  # --amp: backbone under autocast; heads, post-processing in fp32
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def worker(args):
    """``main`` in a worker process of a multi-process run (:func:`pvt_d2.engine.run.run_worker`)."""
    return run_worker(main, args, USER_ERRORS, SHARED_ERRORS)


def check_args(args) -> None:
    """Check the config, the process layout and the datasets once, before any worker process is started."""
    cfg = load_config(args.config_file, args.opts)
    setup_custom_datasets(cfg, args.dataset, args.opts, require_used=True)
    world_size = args.num_gpus * args.num_machines
    if args.amp != "fp32" and not args.eval_only:
        raise ConfigError(f"--amp {args.amp} applies to --eval-only; training uses SOLVER.AMP.ENABLED (on GPUs)")
    if not args.eval_only and world_size and cfg.SOLVER.IMS_PER_BATCH % world_size:
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
    """Parse ``argv`` and run (:func:`pvt_d2.engine.run.run_command`); returns the exit status.

    0 done, 2 a problem the user can fix (one ``ERROR:`` line), 130 / 143
    stopped by SIGINT / SIGTERM (one ``STOPPED:`` line naming the last
    checkpoint and ``--resume``), 1 a worker process that died.
    """
    args = get_parser().parse_args(argv)
    return run_command(args, check_args, main, worker, lambda cfg: cfg.OUTPUT_DIR, USER_ERRORS)


def evaluate_cli(argv=None) -> int:
    """``pvt-d2-evaluate``: ``pvt-d2-train --eval-only`` (COCO evaluation of ``MODEL.WEIGHTS``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli(["--eval-only"] + [a for a in argv if a != "--eval-only"])
