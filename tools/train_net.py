#!/usr/bin/env python
"""Train or evaluate a pvt_d2 detector (RetinaNet, Mask R-CNN, Cascade Mask R-CNN).

    python tools/train_net.py --config-file configs/retinanet_pvt_s.yaml
    python tools/train_net.py --config-file configs/mask_rcnn_pvt_v2_b2.yaml --num-gpus 8
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CFG --resume          # continue from last_checkpoint

``--num-gpus N`` starts N processes per machine: one per GPU, or N CPU
processes (gloo) on a machine without CUDA. Without CUDA the run switches to
the CPU with AMP off and says so in the log.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import pvt_d2.modeling  # noqa: E402,F401  (registers the backbones)
from pvt_d2.config import ConfigError, load_config  # noqa: E402
from pvt_d2.data import DatasetNotFoundError, prepare_datasets  # noqa: E402
from pvt_d2.engine import AtomicCheckpointer, Trainer, use_cpu_if_no_cuda  # noqa: E402


def setup(args):
    """Config from file and overrides, CPU fallback, logging and the dataset check."""
    cfg = load_config(args.config_file, args.opts)
    on_cpu = use_cpu_if_no_cuda(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="pvt_d2")
    if on_cpu:
        logging.getLogger("pvt_d2").info("CUDA is not available: running on the CPU (MODEL.DEVICE=cpu) with AMP off.")
    names = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    prepare_datasets(names)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None) -> int:
    args = default_argument_parser().parse_args(argv)
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except (ConfigError, DatasetNotFoundError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
