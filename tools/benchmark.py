#!/usr/bin/env python
"""Inference latency, throughput and peak memory of a backbone and its whole detector.

    python tools/benchmark.py --config-file configs/mask_rcnn_pvt_v2_b2.yaml               # GPU if present
    python tools/benchmark.py --config-file configs/retinanet_pvt_s.yaml --device cuda --amp --batch-size 4
    python tools/benchmark.py --config-file CFG --device cpu --size 640x480 --iters 5 --warmup 1 --what backbone

Inputs are random images of ``--size`` (``WIDTHxHEIGHT``, default 1333x800),
``--batch-size`` at a time; the detector runs at exactly that size in
inference mode (its RPN / heads keep as many boxes as the config allows).
``--amp`` runs under autocast (float16 on CUDA, bfloat16 on the CPU). After
``--warmup`` untimed passes, ``--iters`` passes are timed (CUDA
synchronised). Peak memory is the increase over the memory in use before the
timed passes: ``torch.cuda.max_memory_allocated`` on a GPU, the resident set
size high-water mark on the CPU (so it covers activations and workspace, not
the weights loaded before).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import pvt_d2.modeling  # noqa: E402,F401
from pvt_d2.config import ConfigError, load_config  # noqa: E402
from pvt_d2.utils.analysis import (  # noqa: E402
    build_backbone,
    build_detector,
    detector_inputs,
    find_pyramid_backbone,
    parse_size,
    random_images,
    run_benchmark,
)


def benchmark(cfg, what, device: str, amp: bool, height: int, width: int, batch_size: int, iters: int,
              warmup: int):
    """Run the requested benchmarks; returns a list of :class:`BenchmarkResult`."""
    results = []
    common = dict(device=device, iters=iters, warmup=warmup, amp=amp, batch_size=batch_size, size=(height, width))
    if "detector" in what:
        model = build_detector(cfg, device)
        if cfg.MODEL.WEIGHTS:
            from detectron2.checkpoint import DetectionCheckpointer

            DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        backbone = find_pyramid_backbone(model)
    else:
        model, backbone = None, build_backbone(cfg, device)
    if "backbone" in what:
        images = random_images(batch_size, height, width, device)
        results.append(run_benchmark(lambda: backbone(images), name="backbone", **common))
    if model is not None:
        inputs = detector_inputs(batch_size, height, width, device)
        results.append(run_benchmark(lambda: model(inputs), name="detector", **common))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--size", default="1333x800", help="input WIDTHxHEIGHT (default 1333x800)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="timed passes (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    parser.add_argument("--what", nargs="+", choices=["backbone", "detector"], default=["backbone", "detector"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    try:
        height, width = parse_size(args.size)
        cfg = load_config(args.config_file, args.opts)
    except (ValueError, ConfigError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.iters < 1 or args.warmup < 0:
        print("ERROR: --batch-size and --iters must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("ERROR: --device cuda requested but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg.defrost()
    cfg.MODEL.DEVICE = args.device
    cfg.freeze()
    results = benchmark(cfg, args.what, args.device, args.amp, height, width, args.batch_size, args.iters,
                        args.warmup)
    on_cuda = torch.device(args.device).type == "cuda"
    where = torch.cuda.get_device_name(args.device) if on_cuda else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.config_file} (MODEL.PVT_D2.ARCH {cfg.MODEL.PVT_D2.ARCH}), torch {torch.__version__}, {where}")
    for r in results:
        print(r.summary())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config_file": args.config_file, "arch": cfg.MODEL.PVT_D2.ARCH,
                       "results": [r.as_dict() for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
