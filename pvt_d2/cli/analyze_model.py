"""Parameters and FLOPs of any pvt_d2 config, at a chosen input size.

    pvt-d2-analyze --config-file configs/mask_rcnn_pvt_v2_b2.yaml
    pvt-d2-analyze --config-file configs/retinanet_pvt_s.yaml --size 1333x800 --depth 2
    pvt-d2-analyze --config-file CFG --tasks parameter --opts MODEL.PVT_D2.ARCH pvt_v2_b0

Parameters are counted for the whole detector and its backbone (and how many
are trainable with the config's ``FREEZE_AT``). FLOPs are counted with
fvcore's ``FlopCountAnalysis`` (one multiply-add = one FLOP, as in the
papers) on one random image of ``--size`` (``WIDTHxHEIGHT``, default
1333x800) for the backbone and, unless ``--backbone-only``, for the whole
detector in inference mode (detectron2's tracing adapter; this depends on how
many boxes the RPN / heads keep, so it varies with weights and image).
Operators fvcore has no rule for are skipped quietly and listed at the end.
"""
import argparse
import json
import sys

import torch

from pvt_d2.checkpoint import bottom_up_backbone
from pvt_d2.config import ConfigError, load_config
from pvt_d2.engine import use_cpu_if_no_cuda
from pvt_d2.utils.analysis import (
    build_detector,
    count_parameters,
    detector_inputs,
    flop_analysis,
    parse_size,
    random_images,
)


def analyze(cfg, tasks, height: int, width: int, backbone_only: bool = False, depth: int = 0) -> dict:
    """The numbers printed by this tool, as a dict (``params``, ``flops``, ``tables``)."""
    device = cfg.MODEL.DEVICE
    model = build_detector(cfg)
    if cfg.MODEL.WEIGHTS:
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    backbone = bottom_up_backbone(model)
    result = {"arch": cfg.MODEL.PVT_D2.ARCH, "input_size": [height, width], "tables": {}}
    if "parameter" in tasks:
        total, n_backbone = count_parameters(model), count_parameters(backbone)
        result["params"] = {
            "detector": total,
            "backbone": n_backbone,
            "neck_and_heads": total - n_backbone,
            "trainable": count_parameters(model, trainable_only=True),
        }
    if "flop" in tasks:
        flops, unsupported = {}, {}
        analysis = flop_analysis(backbone, (random_images(1, height, width, device),))
        flops["backbone"] = analysis.total()
        unsupported["backbone"] = dict(analysis.unsupported_ops())
        if depth:
            from fvcore.nn import flop_count_table

            result["tables"]["backbone"] = flop_count_table(analysis, max_depth=depth)
        if not backbone_only:
            analysis = flop_analysis(model, detector_inputs(1, height, width, device))
            flops["detector"] = analysis.total()
            unsupported["detector"] = dict(analysis.unsupported_ops())
        result["flops"] = flops
        result["unsupported_ops"] = unsupported
    return result


def format_report(result: dict) -> str:
    h, w = result["input_size"]
    lines = [f"config: {result.get('config_file', '-')} (MODEL.PVT_D2.ARCH {result['arch']})"]
    if "params" in result:
        p = result["params"]
        lines += [
            "parameters:",
            f"  detector (total)    {p['detector'] / 1e6:10.2f} M  ({p['detector']:,})",
            f"  backbone            {p['backbone'] / 1e6:10.2f} M  ({p['backbone']:,})",
            f"  neck + heads        {p['neck_and_heads'] / 1e6:10.2f} M",
            f"  trainable           {p['trainable'] / 1e6:10.2f} M",
        ]
    if "flops" in result:
        lines.append(f"FLOPs at {w}x{h} (multiply-adds, fvcore):")
        for part, value in result["flops"].items():
            lines.append(f"  {part:<19} {value / 1e9:10.2f} G")
        for part, ops in result["unsupported_ops"].items():
            if ops:
                lines.append(f"  not counted in {part} (no FLOP rule, mostly element-wise): "
                             + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())))
    for part, table in result.get("tables", {}).items():
        lines += [f"FLOPs by module ({part}):", table]
    return "\n".join(lines)


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", nargs="+", choices=["parameter", "flop"], default=["parameter", "flop"])
    parser.add_argument("--size", default="1333x800", help="input WIDTHxHEIGHT for FLOPs (default 1333x800)")
    parser.add_argument("--backbone-only", action="store_true", help="count FLOPs of the backbone only (faster)")
    parser.add_argument("--depth", type=int, default=0, help="also print FLOPs per module down to this depth")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    try:
        height, width = parse_size(args.size)
        cfg = load_config(args.config_file, args.opts)
    except (ValueError, ConfigError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    use_cpu_if_no_cuda(cfg)
    cfg.freeze()
    result = analyze(cfg, args.tasks, height, width, args.backbone_only, args.depth)
    result["config_file"] = args.config_file
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "tables"}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
