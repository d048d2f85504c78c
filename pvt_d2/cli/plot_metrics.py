"""Plot a training run's curves (losses, learning rate, COCO AP) as PNG files.

    pvt-d2-plot-metrics output/quickstart                 # -> output/quickstart/plots/
    pvt-d2-plot-metrics output/run/metrics.json --output plots/

The input is a run's ``OUTPUT_DIR`` or its ``metrics.json`` (detectron2's JSON
lines). Evaluation results (``TEST.EVAL_PERIOD`` > 0 or the final
evaluation) appear as ``bbox/AP``, ``segm/AP``, ... and are drawn in
``ap.png``.
"""
import argparse
import os
import sys

from pvt_d2.utils.plot import plot_metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run's OUTPUT_DIR or its metrics.json")
    parser.add_argument("--output", help="folder for the PNG files (default: <run folder>/plots)")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "metrics.json") if os.path.isdir(args.run) else args.run
    out_dir = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "plots")
    try:
        written = plot_metrics(path, out_dir)
    except FileNotFoundError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    if not written:
        print(f"ERROR: nothing to plot in {path} (no losses, lr or AP entries)", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
