"""Generate ``MODEL_ZOO.md``: size, cost and speed of every detector config.

    python tools/model_zoo.py                          # all configs -> MODEL_ZOO.md (~15 min on 2 cores)
    python tools/model_zoo.py --only pvt_v2_b0 --output /tmp/zoo.md
    python tools/model_zoo.py --check                  # MODEL_ZOO.md lists every config, params up to date
    python tools/model_zoo.py --check --only pvt_v2_b0 # the same for one architecture (fast)
    python tools/model_zoo.py --params-only            # recount parameters, keep the file's GFLOPs / CPU ms

For every generated detector config in ``configs/`` (``base/`` and the
quickstart are skipped) the table gives the parameters of the backbone and of
the whole detector, the backbone's FLOPs on a 1333x800 image, the backbone's
CPU latency (batch 1, fp32) and the COCO AP published by the papers for that
backbone and detector where there is one. Everything except the published AP
is measured by this script; per-backbone numbers (FLOPs, latency) are
measured once per ``MODEL.PVT_D2.ARCH`` and shared by its four detectors.
Detector parameters come from :func:`pvt_d2.utils.analysis.detector_parameter_counts`;
next to them, the parameter counts the papers print (:func:`published_params`).
The published numbers and their sources are the family manifests'
(:mod:`pvt_d2.modeling.backbone.manifest`). A published AP is shown only next
to a config that follows the official config it was obtained with
(:func:`pvt_d2.model_zoo.recipes.official_config`); the others are listed
under the table. ``tools/model_zoo.py`` runs :func:`main`.
"""
import argparse
import datetime
import functools
import glob
import json
import os
import platform
import re
import sys
import time
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
import yaml

from ..config import load_config
from ..modeling.backbone.key_mapping import resolved_kwargs
from ..modeling.backbone.manifest import families, get_variant
from ..modeling.backbone.registry import get_arch
from ..utils.analysis import (
    build_backbone,
    count_parameters,
    detector_parameter_counts,
    flop_analysis,
    random_images,
    run_benchmark,
)
from . import CONFIG_ROOT
from .recipes import config_name, official_config

CONFIG_DIR = CONFIG_ROOT
#: ``MODEL_ZOO.md`` of the checkout this package lives in.
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "MODEL_ZOO.md")
FLOP_SIZE = (800, 1333)  # (height, width)

# Detector of a config, from the base file it inherits (configs/base/<key>.yaml).
DETECTORS = OrderedDict([
    ("retinanet_1x", "RetinaNet 1x"),
    ("mask_rcnn_1x", "Mask R-CNN 1x"),
    ("mask_rcnn_3x", "Mask R-CNN 3x"),
    ("cascade_mask_rcnn_3x", "Cascade Mask R-CNN 3x"),
])
EXTRA_DETECTORS = {"retinanet_3x": "RetinaNet 3x"}  # published, but no config in configs/


def family_names() -> Dict[str, str]:
    """Family name -> display name, in the registration order (the table's)."""
    return OrderedDict((m.name, m.display) for m in families())


def published_ap() -> Dict[tuple, str]:
    """``(MODEL.PVT_D2.ARCH, detector)`` -> COCO val2017 box AP or ``"box / mask"`` AP, as the papers publish it.

    The papers' own numbers (mmdetection, ImageNet-1k pretrained backbones);
    pvt_d2 has NOT reproduced them (its detectron2 recipe differs in details
    such as the data pipeline and the RPN / head settings). Detectors in
    :data:`EXTRA_DETECTORS` have no config here and are listed under the table.
    """
    return {(v.name, det): ap for m in families() for v in m.variants for det, ap in v.published_ap.items()}


def published_params() -> Dict[str, float]:
    """Config name -> detector parameters (M) as the papers print them (sources: each manifest's ``params_source``)."""
    return {config_name(v.short, det): n for m in families() for v in m.variants
            for det, n in v.published_params.items()}


def published_classifier_params(arch: str) -> int:
    """Parameters of the ImageNet classifier (``C5 x 1000 + 1000``) that ``arch``'s published detector sizes count.

    0 unless the family's published sizes include it (Twins: its official
    detection backbone builds the classifier and never uses it).
    """
    family, variant = get_variant(arch)
    if not family.published_params_include_classifier:
        return 0
    channels = resolved_kwargs(family.model_cls, variant.kwargs)["embed_dims"][-1]
    return channels * 1000 + 1000


def follows_official_config(entry: Dict) -> bool:
    """Whether a config follows an official config file (so the AP published with it applies)."""
    return official_config(entry["arch"], entry["detector"])[0] is not None


def config_detector(path: str) -> str:
    """Detector key of a config: the name of the ``base/`` file it inherits from (e.g. ``mask_rcnn_3x``)."""
    with open(path) as f:
        base = (yaml.safe_load(f) or {}).get("_BASE_", "")
    return os.path.splitext(os.path.basename(base))[0]


def list_configs(config_dir: str = CONFIG_DIR, only: Optional[List[str]] = None) -> List[Dict]:
    """The detector configs of the table, ordered by family, variant, then detector.

    Each entry: ``name``, ``path``, ``detector`` (a :data:`DETECTORS` key),
    ``arch`` and ``family``. Files in sub-folders (``base/``), the quickstart
    and configs inheriting from no known detector base are left out.
    """
    entries = []
    for path in sorted(glob.glob(os.path.join(config_dir, "*.yaml"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name.startswith("quickstart"):
            continue
        detector = config_detector(path)
        if detector not in DETECTORS:
            continue
        arch = load_config(path).MODEL.PVT_D2.ARCH
        if only and arch not in only:
            continue
        entries.append({"name": name, "path": path, "detector": detector, "arch": arch,
                        "family": get_arch(arch).family})
    family_order = list(family_names())
    detector_order = list(DETECTORS)
    entries.sort(key=lambda e: (family_order.index(e["family"]) if e["family"] in family_order else 99,
                                _arch_sort_key(e["arch"]), detector_order.index(e["detector"])))
    return entries


_SIZE_ORDER = ["xxtiny", "xtiny", "tiny", "small", "medium", "base", "large"]


def _arch_sort_key(arch: str):
    """Variants from small to large: numbers (b0..b5, 128s..384, s7..l7) and size words."""
    last = arch.split("_")[-1]
    if last in _SIZE_ORDER:
        return (0, _SIZE_ORDER.index(last), arch)
    m = re.search(r"(\d+)", arch.split("_", 1)[-1])
    return (1, int(m.group(1)) if m else 0, arch)


def _backbone_key(cfg) -> str:
    """Settings that determine the backbone's parameters (drop path and pretrained file do not)."""
    node = cfg.MODEL.PVT_D2.clone()
    node.defrost()
    node.DROP_PATH_RATE = 0.0
    node.PRETRAINED = ""
    return node.dump() + str(len(cfg.MODEL.PIXEL_MEAN))


def measure(entries: List[Dict], flops: bool = True, latency: bool = True, latency_iters: int = 2,
            latency_budget_s: float = 20.0, size=FLOP_SIZE, log=print) -> Dict:
    """Measure the table's numbers.

    Latency: ``latency_iters`` timed passes, fewer (at least one) once they
    took ``latency_budget_s`` seconds in all.

    Returns:
        ``{"archs": {arch: {"params", "gflops", "latency_ms", "latency_passes"}}, "configs": {name:
        {"backbone_params", "detector_params"}}}``; FLOPs / latency entries are None when not measured.
    """
    archs, configs = OrderedDict(), OrderedDict()
    by_arch = OrderedDict()
    for e in entries:
        by_arch.setdefault(e["arch"], []).append(e)
    for i, (arch, group) in enumerate(by_arch.items()):
        start = time.perf_counter()
        backbones = {}
        for e in group:
            # counts and timings do not depend on the weights: nothing is downloaded
            cfg = load_config(e["path"], ["MODEL.DEVICE", "cpu", "MODEL.PVT_D2.PRETRAINED", ""])
            key = _backbone_key(cfg)
            if key not in backbones:
                backbones[key] = build_backbone(cfg)
            configs[e["name"]] = {
                f"{k}_params": v for k, v in detector_parameter_counts(cfg, backbones[key]).items()}
        # FLOPs / latency on the backbone returning the most levels (they all compute the same stages)
        backbone = max(backbones.values(), key=lambda b: len(b.output_shape()))
        stats = {"params": count_parameters(backbone), "gflops": None, "latency_ms": None,
                 "latency_passes": None}
        image = random_images(1, *size)
        if flops:
            stats["gflops"] = flop_analysis(backbone, (image,)).total() / 1e9
        if latency:
            # the FLOP count's traced forward pass doubles as the warm-up
            result = run_benchmark(functools.partial(backbone, image), name=arch, device="cpu", iters=latency_iters,
                                   warmup=0 if flops else 1, size=size, max_seconds=latency_budget_s,
                                   measure_memory=False)
            stats["latency_ms"] = result.mean_ms
            stats["latency_passes"] = len(result.times_s)
        stats["load_1min"] = os.getloadavg()[0]  # how busy the machine was (other jobs make latency noisy)
        archs[arch] = stats
        backbone = backbones = None  # free this architecture before building the next
        log(f"[{i + 1}/{len(by_arch)}] {arch}: {stats['params'] / 1e6:.2f} M params"
            + (f", {stats['gflops']:.1f} GFLOPs" if stats["gflops"] is not None else "")
            + (f", {stats['latency_ms']:.0f} ms" if stats["latency_ms"] is not None else "")
            + f" ({time.perf_counter() - start:.0f} s)")
    return {"archs": archs, "configs": configs}


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _opt(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")


def _was_busy(run_info: Dict) -> bool:
    """More runnable processes than cores besides this script: other jobs competed for the CPU."""
    return run_info.get("load_max", float("inf")) > (os.cpu_count() or 1) + 1


def render(entries: List[Dict], data: Dict, run_info: Dict) -> str:
    """The Markdown text of ``MODEL_ZOO.md``."""
    h, w = run_info["size"]
    measured = run_info.get("measured_line") or (
        f"Measured on {run_info['date']} on {run_info['machine']}. "
        f"Load average (1 / 5 / 15 min) {run_info['load_start']} at the start and {run_info['load_end']} at the end "
        f"({run_info['minutes']:.0f} min in all)"
        + (f"; the highest 1-min load average seen during the run was {run_info['load_max']:.1f}."
           if "load_max" in run_info else "."))
    if "params_date" in run_info:
        measured = (f"Parameters counted from the code on {run_info['params_date']} (`--params-only`); GFLOPs and "
                    f"CPU latencies kept from the last full run. " + measured)
    lines = [
        "# pvt_d2 model zoo",
        "",
        "<!-- Generated by tools/model_zoo.py; do not edit by hand. Regenerate with: python tools/model_zoo.py -->",
        "",
        measured,
        "",
        "**The AP column is not measured by pvt_d2**: it quotes the papers (see below). Everything else is "
        "measured by `tools/model_zoo.py` from the code in this repository:",
        "",
        "- **Params**: `sum(p.numel())` of the built backbone and of the whole detector "
        "(`detectron2.modeling.build_model`), in millions.",
        f"- **GFLOPs**: backbone only (no FPN or heads), one {w}x{h} image, counted by fvcore "
        "(one multiply-add = one FLOP, as in the papers; attention products included, element-wise ops not). "
        "Whole-detector FLOPs: `tools/analyze_model.py`.",
        f"- **CPU ms**: backbone forward pass, batch 1, {w}x{h}, fp32, mean of {run_info['latency_iters']} passes "
        f"after a warm-up (fewer, at least one, once they took {run_info['latency_budget_s']:.0f} s in all). "
        + ("The machine was shared with other jobs running at the same time (see the load average above), so "
           "these latencies are noisy: read them as rough relative costs on a small CPU, not as benchmarks. "
           if _was_busy(run_info) else "Single measurements on a small CPU: rough relative costs. ")
        + "Measure your own hardware with `tools/benchmark.py` (GPU, AMP, batch sizes).",
        "- **Paper params**: the detector's parameters as printed by the paper. Twins' numbers include the "
        "ImageNet classifier (and class token) that the official Twins detection backbone builds and never "
        "uses; pvt_d2's backbones carry no classifier, so Twins rows are 0.5-1.0 M smaller "
        "(C5 x 1000 + 1000 parameters).",
        "- **Published AP**: COCO val2017 box AP, or box / mask AP, as **published by the papers, trained with "
        "mmdetection** (ImageNet-1k pretraining; 1x = 12 epochs single-scale, 3x = 36 epochs multi-scale). "
        "**Not reproduced here**. Shown only next to a config that follows the official config of that result "
        "(`docs/RECIPES.md`); \"-\": no published number, or no released recipe to follow (then listed under "
        "the tables).",
        "",
        "## Backbones",
        "",
        f"| Backbone (`MODEL.PVT_D2.ARCH`) | Family | Params (M) | GFLOPs @{w}x{h} | CPU ms @{w}x{h} |",
        "|---|---|---:|---:|---:|",
    ]
    names = family_names()
    for arch in OrderedDict.fromkeys(e["arch"] for e in entries):
        s = data["archs"][arch]
        family = names.get(get_arch(arch).family, get_arch(arch).family)
        lines.append(f"| `{arch}` | {family} | {_millions(s['params'])} | {_opt(s['gflops'], '.1f')} | "
                     f"{_opt(s['latency_ms'], '.0f')} |")
    lines += ["", "## Detectors", ""]
    unmatched: List[str] = []
    aps, paper_params = published_ap(), published_params()
    by_family = OrderedDict()
    for e in entries:
        by_family.setdefault(e["family"], []).append(e)
    for family, group in by_family.items():
        lines += [f"### {names.get(family, family)}", "",
                  "| Config | Detector | Backbone | Backbone params (M) | Detector params (M) | Paper params (M) | "
                  "Backbone GFLOPs | Backbone CPU ms | Published AP (mmdetection, not reproduced) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for e in group:
            s, c = data["archs"][e["arch"]], data["configs"][e["name"]]
            ap = aps.get((e["arch"], e["detector"]), "-")
            if ap != "-" and not follows_official_config(e):
                unmatched.append(f"`{e['arch']}` {DETECTORS[e['detector']]}: {ap}")
                ap = "-"
            paper = paper_params.get(e["name"])
            lines.append(
                f"| [{e['name']}](configs/{e['name']}.yaml) | {DETECTORS[e['detector']]} | `{e['arch']}` | "
                f"{_millions(c['backbone_params'])} | {_millions(c['detector_params'])} | "
                f"{'-' if paper is None else format(paper, '.1f')} | "
                f"{_opt(s['gflops'], '.1f')} | {_opt(s['latency_ms'], '.0f')} | {ap} |")
        lines.append("")
    arch_order = list(OrderedDict.fromkeys(e["arch"] for e in entries))
    shown = [(arch, det) for arch, det in aps if det in EXTRA_DETECTORS and arch in arch_order]
    extra = [f"`{arch}` {EXTRA_DETECTORS[det]}: {aps[arch, det]}"
             for arch, det in sorted(shown, key=lambda key: arch_order.index(key[0]))]
    lines += ["## Notes on the published numbers", "", _sources_line()]
    if extra:
        lines += ["", "Published results for detectors without a config here: " + "; ".join(extra) + "."]
    if unmatched:
        lines += ["", "Published results whose training recipe was not released (our config of that detector is "
                  "modelled on another official config, see docs/RECIPES.md, so the number is not shown in its "
                  "row): " + "; ".join(unmatched) + "."]
    lines += ["", "A detectron2 port of PVT (pvt_detectron2) reported RetinaNet 1x box AP 41.6 (PVT-S), "
              "44.2 (PCPVT-S) and 43.1 (SVT-S).", ""]
    return "\n".join(lines)


def _sources_line() -> str:
    """Which paper each family's published numbers come from, and the families without any."""
    cited = [f"{m.display} ({m.cite})" for m in families() if any(v.published_ap for v in m.variants)]
    silent = [m.display for m in families() if not any(v.published_ap for v in m.variants)]
    line = f"Sources: {', '.join(cited)}; all trained with mmdetection."
    if silent:
        names = " and ".join([", ".join(silent[:-1]), silent[-1]]) if len(silent) > 1 else silent[0]
        line += f" {names} {'have' if len(silent) > 1 else 'has'} no published detection results."
    return line


_BACKBONE_ROW = re.compile(r"^\| `(?P<arch>[^`]+)` \| [^|]+ \| [0-9.]+ \| (?P<gflops>[0-9.]+|-) \| "
                          r"(?P<ms>[0-9.]+|-) \|\s*$")


def kept_measurements(path: str) -> Dict:
    """GFLOPs, CPU ms and the measurement paragraph of an existing ``MODEL_ZOO.md`` (for ``--params-only``).

    Returns:
        ``{"archs": {arch: {"gflops", "latency_ms"}}, "measured_line", "latency_iters", "latency_budget_s"}``.
    """
    archs, measured, text = {}, None, open(path).read()
    for line in text.splitlines():
        m = _BACKBONE_ROW.match(line)
        if m:
            archs[m.group("arch")] = {k: None if m.group(g) == "-" else float(m.group(g))
                                      for k, g in (("gflops", "gflops"), ("latency_ms", "ms"))}
        elif "Measured on " in line and measured is None:
            measured = line[line.index("Measured on "):]
    iters = re.search(r"mean of (\d+) passes", text)
    budget = re.search(r"once they took (\d+) s in all", text)
    return {"archs": archs, "measured_line": measured, "latency_iters": int(iters.group(1)) if iters else 2,
            "latency_budget_s": float(budget.group(1)) if budget else 20.0}


_ROW = re.compile(r"^\| \[(?P<name>[^\]]+)\]\(configs/[^)]+\) \| [^|]+ \| `(?P<arch>[^`]+)` \| "
                  r"(?P<bb>[0-9.]+) \| (?P<det>[0-9.]+) \|")


def check(path: str, entries: List[Dict], only: Optional[List[str]]) -> List[str]:
    """Problems of an existing ``MODEL_ZOO.md``: missing / extra / stale rows (parameters recomputed)."""
    if not os.path.isfile(path):
        return [f"{path} does not exist; run python tools/model_zoo.py"]
    rows = {}
    with open(path) as f:
        for line in f:
            m = _ROW.match(line)
            if m:
                rows[m.group("name")] = m.groupdict()
    problems = []
    names = {e["name"] for e in entries}
    for name in sorted(set(rows) - names):
        if not only or rows[name]["arch"] in only:
            problems.append(f"{name}: listed but no such detector config")
    data = measure(entries, flops=False, latency=False, log=lambda *_: None)
    for e in entries:
        row = rows.get(e["name"])
        if row is None:
            problems.append(f"{e['name']}: missing")
            continue
        c = data["configs"][e["name"]]
        expected = (_millions(c["backbone_params"]), _millions(c["detector_params"]))
        if (row["bb"], row["det"]) != expected:
            problems.append(f"{e['name']}: params {row['bb']} / {row['det']} M in the file, "
                            f"{expected[0]} / {expected[1]} M now")
    return problems


@torch.no_grad()
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="Markdown file to write (default MODEL_ZOO.md)")
    parser.add_argument("--only", nargs="+", metavar="ARCH", help="only these MODEL.PVT_D2.ARCH values")
    parser.add_argument("--check", action="store_true",
                        help="do not write: verify --output lists every config with up-to-date parameters")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU latency")
    parser.add_argument("--params-only", action="store_true",
                        help="recount the parameters only and keep the GFLOPs / CPU ms of the existing --output "
                             "(whose latencies take long to measure on a small machine)")
    parser.add_argument("--iters", type=int, default=2, help="timed passes per backbone (default 2)")
    parser.add_argument("--latency-budget", type=float, default=20.0,
                        help="stop timing a backbone once its passes took this many seconds (default 20)")
    parser.add_argument("--save-json", metavar="PATH", help="also save the measurements to this JSON file")
    parser.add_argument("--from-json", metavar="PATH", help="render from measurements saved by --save-json "
                                                            "instead of measuring")
    args = parser.parse_args(argv)
    if args.only:
        unknown = []
        for arch in args.only:
            try:
                get_arch(arch)
            except KeyError:
                unknown.append(arch)
        if unknown:
            print(f"ERROR: unknown architecture(s) {', '.join(unknown)}", file=sys.stderr)
            return 2
    entries = list_configs(only=args.only)
    if not entries:
        print("ERROR: no detector configs found", file=sys.stderr)
        return 2
    if args.check:
        problems = check(args.output, entries, args.only)
        for p in problems:
            print(p)
        print(f"{args.output}: {len(entries)} configs checked, {len(problems)} problem(s)")
        return 1 if problems else 0
    if args.params_only:
        if not os.path.isfile(args.output):
            print(f"ERROR: --params-only keeps the measurements of {args.output}, which does not exist",
                  file=sys.stderr)
            return 2
        kept = kept_measurements(args.output)
        missing = sorted({e["arch"] for e in entries} - set(kept["archs"]))
        if missing:
            print(f"ERROR: {args.output} has no GFLOPs / CPU ms for {', '.join(missing)}; run without --params-only",
                  file=sys.stderr)
            return 2
        start = time.time()
        data = measure(entries, flops=False, latency=False, log=lambda msg: print(msg, flush=True))
        for arch, stats in data["archs"].items():
            stats.update(kept["archs"][arch])
        run_info = {"params_date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                    "measured_line": kept["measured_line"], "size": list(FLOP_SIZE),
                    "latency_iters": kept["latency_iters"], "latency_budget_s": kept["latency_budget_s"],
                    "minutes": (time.time() - start) / 60}
    elif args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        data, run_info = saved["data"], saved["run_info"]
        missing = [e["name"] for e in entries if e["name"] not in data["configs"]]
        if missing:
            print(f"ERROR: {args.from_json} has no measurements for {', '.join(missing)}", file=sys.stderr)
            return 2
    else:
        start, load_start = time.time(), os.getloadavg()
        data = measure(entries, flops=not args.no_flops, latency=not args.no_latency, latency_iters=args.iters,
                       latency_budget_s=args.latency_budget, log=lambda msg: print(msg, flush=True))
        run_info = {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine_description(),
            "load_start": " / ".join(f"{x:.1f}" for x in load_start),
            "load_end": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "minutes": (time.time() - start) / 60,
            "load_max": max([load_start[0], os.getloadavg()[0]] + [a["load_1min"] for a in data["archs"].values()]),
            "size": list(FLOP_SIZE),
            "latency_iters": args.iters,
            "latency_budget_s": args.latency_budget,
        }
        if args.save_json:
            with open(args.save_json, "w") as f:
                json.dump({"data": data, "run_info": run_info}, f, indent=1)
    text = render(entries, data, run_info)
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output} ({len(entries)} configs, {len(data['archs'])} backbones, "
          f"measured in {run_info['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
