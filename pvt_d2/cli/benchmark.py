"""Inference latency, throughput and peak memory of a backbone and its whole detector.

    pvt-d2-benchmark --config-file configs/mask_rcnn_pvt_v2_b2.yaml               # GPU if present
    pvt-d2-benchmark --config-file configs/retinanet_pvt_s.yaml --device cuda --amp --batch-size 4
    pvt-d2-benchmark --config-file CFG --device cpu --size 640x480 --iters 5 --warmup 1 --what backbone
    pvt-d2-benchmark --config-file configs/mask_rcnn_pvt_v2_b2.yaml --device cpu --amp bf16 --what backbone
    pvt-d2-benchmark --config-file CFG --what train --iters 20     # training iterations/s and images/s

Inputs are random images of ``--size`` (``WIDTHxHEIGHT``, default 1333x800),
``--batch-size`` at a time; the detector runs at exactly that size in
inference mode (its RPN / heads keep as many boxes as the config allows).
``--amp fp16|bf16`` runs the backbone (``--what backbone``: the pvt_d2
trunk; ``--what detector``: trunk and FPN) under autocast and the rest of the
detector in float32 (see :mod:`pvt_d2.utils.precision`); a bare ``--amp`` is
float16 on CUDA, bfloat16 on the CPU. A precision the hardware lacks (bfloat16
on a CPU without AVX512-BF16/AMX) falls back to float32 with a warning. After
``--warmup`` untimed passes, ``--iters`` passes are timed (CUDA
synchronised). Peak memory is measured on one more, untimed pass (a CPU RSS
sampling thread beside timed passes would slow them): the increase over the
memory in use before it, ``torch.cuda.max_memory_allocated`` on a GPU, the
resident set size high-water mark on the CPU (so it covers activations and
workspace, not the weights loaded before).

``--what train-memory`` runs one training step (forward + backward) of the
detector on one random image with one box/mask per image and reports: the
memory the backbone's activations hold when its forward ends (everything kept
for its backward, plus its outputs), and the peak of the whole step, each as
the increase over the memory in use before the step (CUDA allocator counters
on a GPU, RSS on the CPU). ``--act-checkpoint`` turns on
``MODEL.PVT_D2.ACTIVATION_CHECKPOINT``; run it once with and once without,
each in a fresh process:

    pvt-d2-benchmark --config-file configs/mask_rcnn_pvt_v2_b2.yaml --device cpu --what train-memory
    pvt-d2-benchmark --config-file configs/mask_rcnn_pvt_v2_b2.yaml --device cpu --what train-memory \
        --act-checkpoint
"""
import argparse
import json
import sys
import time

import torch

import pvt_d2.modeling  # noqa: F401
from pvt_d2.config import ConfigError, load_config
from pvt_d2.utils.precision import AMP_CHOICES, AutocastBackbone, resolve_amp
from pvt_d2.checkpoint import bottom_up_backbone
from pvt_d2.utils.analysis import (
    build_backbone,
    build_detector,
    detector_inputs,
    parse_size,
    random_images,
    run_benchmark,
)


def _memory_now(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device)
    from pvt_d2.utils.analysis import _current_rss_bytes

    return _current_rss_bytes() or 0


def train_memory(cfg, device: str, height: int, width: int, batch_size: int) -> dict:
    """Memory of one detector training step: backbone activations at the end of its forward, and the step's peak.

    Returns:
        ``{"backbone_activations_mb", "step_peak_mb", "act_checkpoint"}``.
    """
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    from pvt_d2.utils.analysis import PeakMemory

    model = build_detector(cfg, device).train()
    backbone = bottom_up_backbone(model)
    inputs = detector_inputs(batch_size, height, width, device)
    for d in inputs:
        inst = Instances((height, width))
        inst.gt_boxes = Boxes(torch.tensor([[0.2 * width, 0.2 * height, 0.6 * width, 0.7 * height]], device=device))
        inst.gt_classes = torch.zeros(1, dtype=torch.int64, device=device)
        mask = torch.zeros(1, height, width, dtype=torch.bool, device=device)
        mask[:, int(0.2 * height):int(0.7 * height), int(0.2 * width):int(0.6 * width)] = True
        inst.gt_masks = BitMasks(mask)
        d["instances"] = inst
    marks = {}

    def mark(name):
        def hook(*_):
            marks.setdefault(name, _memory_now(device))
        return hook

    hooks = [backbone.register_forward_pre_hook(mark("start")), backbone.register_forward_hook(mark("end"))]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with torch.enable_grad(), EventStorage(0), PeakMemory(device) as peak:
        losses = model(inputs)
        peak.sample()  # the activations are all alive here
        sum(losses.values()).backward()
    for h in hooks:
        h.remove()
    return {"backbone_activations_mb": (marks["end"] - marks["start"]) / 2 ** 20,
            "step_peak_mb": peak.peak_bytes / 2 ** 20,
            "act_checkpoint": bool(cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT)}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def train_throughput(cfg, device: str, amp_dtype, iters: int, warmup: int) -> dict:
    """Training iterations/s and images/s of ``cfg``'s detector, without and with data loading.

    Both phases run full training iterations (forward, backward, optimizer
    step) of the model, optimizer and train loader that ``pvt-d2-train``
    builds (``SOLVER.IMS_PER_BATCH`` images per iteration, one process).
    "Data loading excluded" repeats one batch taken from the loader
    beforehand; "included" takes every batch from the loader inside the timed
    loop (``DATALOADER.NUM_WORKERS`` workers). ``amp_dtype`` runs the forward
    under autocast (float16 with a gradient scaler, bfloat16 without).

    Returns:
        ``{"fixed_batch": {...}, "with_loader": {...}, "ims_per_batch", "amp"}``; each phase holds
        ``iters_per_s``, ``images_per_s`` and ``times_s``.
    """
    from detectron2.utils.events import EventStorage

    from pvt_d2.data import prepare_datasets
    from pvt_d2.engine import Trainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    cfg.MODEL.PVT_D2.PRETRAINED = ""  # speed does not depend on the weights: nothing fetched
    cfg.freeze()
    prepare_datasets(list(cfg.DATASETS.TRAIN))
    model = Trainer.build_model(cfg).train()
    optimizer = Trainer.build_optimizer(cfg, model)
    loader = iter(Trainer.build_train_loader(cfg))
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp_dtype == torch.float16)

    def step(batch):
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            losses = model(batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    def timed(next_batch):
        for _ in range(warmup):
            step(next_batch())
        _sync(device)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step(next_batch())
            _sync(device)
            times.append(time.perf_counter() - start)
        mean = sum(times) / len(times)
        return {"iters_per_s": 1 / mean, "images_per_s": cfg.SOLVER.IMS_PER_BATCH / mean, "times_s": times}

    with EventStorage(0):
        fixed = next(loader)
        result = {"fixed_batch": timed(lambda: fixed), "with_loader": timed(lambda: next(loader))}
    result.update(ims_per_batch=cfg.SOLVER.IMS_PER_BATCH, amp=str(amp_dtype).replace("torch.", "") if amp_dtype
                  else "float32")
    return result


def benchmark(cfg, what, device: str, amp_dtype, height: int, width: int, batch_size: int, iters: int,
              warmup: int):
    """Run the requested benchmarks; returns a list of :class:`BenchmarkResult`.

    ``amp_dtype`` (None = float32) is the autocast dtype of the backbone; the
    rest of the detector runs in float32.
    """
    results = []
    precision = f"{str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype is not None else "float32"
    common = dict(device=device, iters=iters, warmup=warmup, batch_size=batch_size, size=(height, width),
                  precision=precision)
    if "detector" in what:
        model = build_detector(cfg, device)
        if cfg.MODEL.WEIGHTS:
            from detectron2.checkpoint import DetectionCheckpointer

            DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        backbone = bottom_up_backbone(model)
        if amp_dtype is not None:
            model.backbone = AutocastBackbone(model.backbone, amp_dtype)
    else:
        model, backbone = None, build_backbone(cfg, device)
    if "backbone" in what:
        images = random_images(batch_size, height, width, device)

        def run_backbone():
            with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                return backbone(images)

        results.append(run_benchmark(run_backbone, name="backbone", **common))
    if model is not None:
        inputs = detector_inputs(batch_size, height, width, device)
        results.append(run_benchmark(lambda: model(inputs), name="detector", **common))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--amp", nargs="?", const="auto", default="fp32", choices=AMP_CHOICES,
                        help="autocast precision of the backbone: fp32 (default), fp16 or bf16; a bare --amp is "
                             "fp16 on CUDA, bf16 on the CPU; falls back to fp32 (with a warning) where unsupported")
    parser.add_argument("--size", default="1333x800", help="input WIDTHxHEIGHT (default 1333x800)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10, help="timed passes (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    parser.add_argument("--what", nargs="+", choices=["backbone", "detector", "train-memory", "train"],
                        default=["backbone", "detector"])
    parser.add_argument("--act-checkpoint", action="store_true",
                        help="MODEL.PVT_D2.ACTIVATION_CHECKPOINT True (matters for --what train-memory)")
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
    if args.act_checkpoint:
        cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT = True
    cfg.freeze()
    amp_dtype, note = resolve_amp(args.amp, args.device)
    if note:
        print(f"WARNING: {note}", file=sys.stderr)
    if "train" in args.what:
        from pvt_d2.data import DatasetNotFoundError

        try:
            res = train_throughput(cfg, args.device, amp_dtype, args.iters, args.warmup)
        except (ValueError, ConfigError, DatasetNotFoundError) as e:  # ValueError: DatasetError included
            print(f"ERROR: {e}", file=sys.stderr)
            return 2
        where = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" \
            else f"{torch.get_num_threads()} CPU threads"
        print(f"{args.config_file} (MODEL.PVT_D2.ARCH {cfg.MODEL.PVT_D2.ARCH}), training, "
              f"{res['ims_per_batch']} images per iteration, {res['amp']}, {where}, {args.iters} timed iterations")
        for key, label in (("fixed_batch", "data loading excluded (one pre-loaded batch)"),
                           ("with_loader", "data loading included (the train loader)")):
            print(f"train, {label}: {res[key]['iters_per_s']:.3f} iter/s, {res[key]['images_per_s']:.2f} img/s")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config_file": args.config_file, "arch": cfg.MODEL.PVT_D2.ARCH, "train": res}, f,
                          indent=2)
        return 0
    if "train-memory" in args.what:
        mem = train_memory(cfg, args.device, height, width, args.batch_size)
        print(f"{args.config_file} (MODEL.PVT_D2.ARCH {cfg.MODEL.PVT_D2.ARCH}), one training step at "
              f"{width}x{height}, batch {args.batch_size}, activation checkpointing "
              f"{'on' if mem['act_checkpoint'] else 'off'}: backbone activations {mem['backbone_activations_mb']:.0f} "
              f"MB, step peak {mem['step_peak_mb']:.0f} MB (increase over the memory in use before the step)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"config_file": args.config_file, "arch": cfg.MODEL.PVT_D2.ARCH, "train_memory": mem}, f)
        return 0
    results = benchmark(cfg, args.what, args.device, amp_dtype, height, width, args.batch_size, args.iters,
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
