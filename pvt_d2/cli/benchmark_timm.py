"""Time pvt_d2 backbones against timm's ``features_only`` models of the same variant.

    pvt-d2-benchmark-timm                                   # all pairs, 2 threads, 3 rounds
    pvt-d2-benchmark-timm --variants pvt_v2_b2 twins_svt_small --rounds 5
    pvt-d2-benchmark-timm --sizes 224 --baseline-root /tmp/old_checkout
    # PVT v1 (no timm model): only against another checkout
    pvt-d2-benchmark-timm --variants pvt_tiny --sizes 800x1344 --baseline-root /tmp/old_checkout

Every measurement runs in its own Python process (``--worker`` mode of this
script), so one model's allocator state, thread pools and caches never affect
the other's. A round measures every (variant, size) pair once for pvt_d2 and
once for timm, alternating which goes first from one round to the next; the
table reports, per pair, the median over rounds of each process's median
forward time and their ratio (ours / timm, below 1 means pvt_d2 is faster),
and "paired", the median of the per-round ratios (the two measurements of
a round run back to back, so this ratio cancels the machine's slow drift),
and "rounds", the per-round ratios themselves (their spread shows how noisy
the machine was). With ``--baseline-root`` a third implementation, pvt_d2 imported from another
checkout (e.g. the commit before a change), is timed in the same rounds, so
before/after numbers come from the same interleaved run.

Setting: CPU, float32, eager, ``model.eval()`` under ``torch.no_grad()``,
random weights (timing does not depend on them), ``--threads`` torch threads
(default 2). ``--cpu-time`` also reports the process CPU time per forward
(``time.process_time``, all threads together), which another job on the
machine disturbs far less than the wall time; with ``--threads 1`` it is the
steadiest A/B measure on a shared machine. Sizes: 224x224 at batch 8 and 800x1344 at batch 1 (timm's LeViT
and GC ViT only run at their 224 training size, so they are timed at 224
only). Twins is built without the SVT detection ``extra_norm`` so both sides
compute the same function.

``--steady-malloc`` runs every worker with glibc's heap trimming off and its
mmap threshold fixed (:data:`STEADY_MALLOC`), the same for every side. With
glibc's defaults, whether freed activations go back to the system and are
page-faulted in again on the next forward depends on each process's heap
layout: the same model then takes 11,000 to 30,000 page faults per forward
from one process to the next, and that, not the model code, decides an A/B
ratio near 1. Without the option the workers run as a user's process does.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

# the folder holding the pvt_d2 package measured as "after" (a checkout, or site-packages)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Variants with a timm ``features_only`` counterpart (the default set).
TIMM_VARIANTS = ("pvt_v2_b2", "twins_pcpvt_small", "twins_svt_small", "levit_256", "gcvit_tiny")
#: Variants timm lacks (PVT v1): timed against ``--baseline-root`` only.
NO_TIMM = ("pvt_tiny",)
VARIANTS = TIMM_VARIANTS + NO_TIMM
#: Families timm can only run at their training resolution.
ONLY_224 = ("levit", "gcvit")
#: ``name`` -> (height, width, batch size).
SIZES = {"224": (224, 224, 8), "800x1344": (800, 1344, 1)}
IMPLS = ("ours", "timm")
#: glibc tunables of ``--steady-malloc``: the largest mmap threshold glibc accepts on 64-bit systems (32 MiB,
#: which also stops its dynamic adjustment) and a trim threshold no forward reaches.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2 ** 20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2 ** 30)}


def sizes_for(variant: str, sizes: Sequence[str]) -> List[str]:
    """The requested sizes at which ``variant`` is timed."""
    if variant.startswith(ONLY_224):
        return [s for s in sizes if s == "224"]
    return list(sizes)


def _build(impl: str, variant: str):
    if impl == "timm":
        import timm

        return timm.create_model(variant, features_only=True, pretrained=False)
    from pvt_d2.modeling import create_backbone

    kwargs = {"extra_norm": False} if variant.startswith("twins") else {}
    if variant.startswith("levit"):
        kwargs["out_features"] = ["res2", "res3", "res4", "res5"]
    return create_backbone(variant, **kwargs)


def run_worker(impl: str, variant: str, height: int, width: int, batch: int, threads: int, warmup: int,
               iters: int) -> Dict[str, float]:
    """Time one model in this process; returns per-forward wall and process CPU seconds (median, min)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _build(impl, variant).eval()
    x = torch.randn(batch, 3, height, width)
    times, cpu_times = [], []
    with torch.no_grad():
        for i in range(warmup + iters):
            start, cpu_start = time.perf_counter(), time.process_time()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
    return {"median": statistics.median(times), "min": min(times),
            "cpu_median": statistics.median(cpu_times), "cpu_min": min(cpu_times)}


def _measure(impl: str, variant: str, size: str, args, baseline_root: Optional[str]) -> Dict[str, float]:
    """Run one worker process; returns its timings (see :func:`run_worker`) in seconds."""
    height, width, batch = SIZES[size]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--variant-name", variant,
           "--worker-size", f"{height}x{width}x{batch}", "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--iters", str(args.iters)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.steady_malloc:
        env.update(STEADY_MALLOC)
    root = baseline_root if impl == "before" else REPO_ROOT
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} {variant} {size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(args) -> Dict[Tuple[str, str], Dict[str, List[float]]]:
    """Interleaved rounds over every pair.

    Returns:
        ``{(variant, size): {impl: [median wall seconds per round], impl + "_cpu": [median CPU seconds]}}``.
    """
    impls = list(IMPLS) + (["before"] if args.baseline_root else [])
    pairs = [(v, s) for v in args.variants for s in sizes_for(v, args.sizes)]
    results = {p: {k: [] for i in impls for k in (i, i + "_cpu")} for p in pairs}
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else impls[::-1]
        for variant, size in pairs:
            for impl in order:
                if impl == "timm" and variant in NO_TIMM:
                    continue
                t = _measure(impl, variant, size, args, args.baseline_root)
                results[(variant, size)][impl].append(t["median"])
                results[(variant, size)][impl + "_cpu"].append(t["cpu_median"])
                print(f"round {r + 1}/{args.rounds} {variant:18s} {size:9s} {impl:6s} {t['median'] * 1e3:9.1f} ms "
                      f"(CPU {t['cpu_median'] * 1e3:9.1f} ms)", file=sys.stderr, flush=True)
    return results


def paired_ratio(ours: List[float], ref: List[float]) -> float:
    """Median over rounds of each round's ratio ``ours / ref``.

    The two measurements of a round run back to back, so a machine that
    slows down for a while moves both: the per-round ratio cancels that
    drift, which the ratio of the two overall medians does not.
    """
    return statistics.median(o / r for o, r in zip(ours, ref))


def markdown_table(results, baseline: bool, cpu_time: bool = False) -> str:
    """The README table: medians (ms per forward) and ratios; CPU-time columns with ``cpu_time``.

    "ratio" is the ratio of the two medians, "paired" the median of the
    per-round ratios (:func:`paired_ratio`), "rounds" those ratios in round
    order (their spread is the machine's noise).
    """
    head = "| variant | input (batch) | pvt_d2 ms | timm ms | ratio pvt_d2 / timm | paired | rounds |"
    if baseline:
        head += " before ms | before / timm | pvt_d2 / before | paired | rounds |"
    if cpu_time:
        head += " pvt_d2 CPU ms | timm CPU ms | CPU ratio |"
        if baseline:
            head += " before CPU ms | before / timm CPU | pvt_d2 / before CPU | paired | rounds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (variant, size), times in results.items():
        h, w, b = SIZES[size]
        line = f"| {variant} | {h}x{w} ({b}) |"
        for suffix in ("", "_cpu") if cpu_time else ("",):
            ours = statistics.median(times["ours" + suffix])
            ref = statistics.median(times["timm" + suffix]) if times["timm" + suffix] else None
            line += f" {ours * 1e3:.1f} | "
            if ref is None:
                line += "n/a | n/a |" + (" n/a | n/a |" if not suffix else "")
            else:
                line += f"{ref * 1e3:.1f} | {ours / ref:.2f} |"
                if not suffix:
                    rounds = " ".join(f"{o / r:.2f}" for o, r in zip(times["ours"], times["timm"]))
                    line += f" {paired_ratio(times['ours'], times['timm']):.2f} | {rounds} |"
            if baseline:
                before = statistics.median(times["before" + suffix])
                line += f" {before * 1e3:.1f} | " + ("n/a" if ref is None else f"{before / ref:.2f}")
                line += f" | {ours / before:.2f} |"
                mine, theirs = times["ours" + suffix], times["before" + suffix]
                rounds = " ".join(f"{o / r:.2f}" for o, r in zip(mine, theirs))
                line += f" {paired_ratio(mine, theirs):.2f} | {rounds} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(TIMM_VARIANTS), choices=VARIANTS,
                        help="default: every variant with a timm counterpart; " + ", ".join(NO_TIMM)
                        + " (no timm model) only against --baseline-root")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per process (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per process first (default 2)")
    parser.add_argument("--baseline-root", metavar="DIR",
                        help="also time pvt_d2 imported from this checkout (column 'before')")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also report process CPU time per forward (steadier on a shared machine)")
    parser.add_argument("--steady-malloc", action="store_true",
                        help="run every worker with glibc's heap trimming off (see above); the steadiest A/B")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")
    parser.add_argument("--worker", choices=IMPLS + ("before",), help=argparse.SUPPRESS)
    parser.add_argument("--variant-name", help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        print("ERROR: --rounds, --iters and --threads must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.worker:
        height, width, batch = (int(v) for v in args.worker_size.split("x"))
        impl = "ours" if args.worker == "before" else args.worker
        print(json.dumps(run_worker(impl, args.variant_name, height, width, batch, args.threads, args.warmup,
                                    args.iters)))
        return 0
    if args.baseline_root and not os.path.isdir(os.path.join(args.baseline_root, "pvt_d2")):
        print(f"ERROR: --baseline-root {args.baseline_root} holds no pvt_d2 package", file=sys.stderr)
        return 2
    import torch

    results = compare(args)
    malloc = ", glibc heap trimming off (--steady-malloc)" if args.steady_malloc else ""
    print(f"CPU fp32 eager, {args.threads} threads{malloc}, torch {torch.__version__}; median over {args.rounds} "
          f"interleaved rounds of each process's median of {args.iters} forwards (ms per forward); "
          f"paired: median of the rounds' ratios (rounds: each round's ratio)\n")
    print(markdown_table(results, bool(args.baseline_root), args.cpu_time))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"variant": v, "size": s, **times} for (v, s), times in results.items()], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
