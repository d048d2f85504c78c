"""The quickstart: train, evaluate and look at a small detector on built-in data.

Trains ``configs/quickstart_pvt_v2_b0.yaml`` (a random-init PVT v2-b0 Mask
R-CNN) on the synthetic shapes set, which is generated on first use, prints
the COCO box and mask AP on its validation split, draws the detections of a
few validation images, plots the training curves and writes the evaluation
report (``report/index.html``: where the detector fails, see docs/REPORT.md),
all under ``output/quickstart/``. Extra arguments are config overrides, e.g.
``pvt-d2-quickstart SOLVER.MAX_ITER 100`` or
``pvt-d2-quickstart OUTPUT_DIR output/quickstart_seed7 SEED 7``.

Its LazyConfig twin, ``pvt-d2-lazy-train --config-file
configs/lazy/quickstart_pvt_v2_b0.py``, trains the same way (same seed: same
initial weights, images, augmentations and schedule). A bad override or a
quickstart already running into the same ``OUTPUT_DIR`` ends with one
``ERROR:`` line and exit status 2.
"""
import json
import os
import sys
import time

import cv2
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_setup

from pvt_d2.config import ConfigError, load_config
from pvt_d2.data import prepare_datasets
from pvt_d2.engine import Trainer, use_cpu_if_no_cuda
from pvt_d2.engine.output_dir import OutputDirError, OutputDirLock
from pvt_d2.engine.predictor import Predictor
from pvt_d2.model_zoo import get_config_file
from pvt_d2.utils.visualize import draw_instances

CONFIG = get_config_file("quickstart_pvt_v2_b0.yaml")
NUM_VIS_IMAGES = 6


def draw_validation_images(cfg, out_dir: str) -> list:
    """Run the trained model on a few validation images and save the drawings."""
    os.makedirs(out_dir, exist_ok=True)
    predictor = Predictor(cfg)  # weights through the safe reader, as the demo loads them
    dataset = cfg.DATASETS.TEST[0]
    meta = MetadataCatalog.get(dataset)
    paths = []
    for record in DatasetCatalog.get(dataset)[:NUM_VIS_IMAGES]:
        bgr = cv2.imread(record["file_name"])
        instances = predictor(bgr)["instances"].to("cpu")
        drawn = draw_instances(bgr[:, :, ::-1], instances, meta, score_threshold=0.5)
        path = os.path.join(out_dir, os.path.basename(record["file_name"]))
        cv2.imwrite(path, drawn[:, :, ::-1])
        paths.append(path)
    return paths


def setup(argv):
    """The quickstart config with the overrides ``argv``, on the CPU without CUDA, seeded and logged."""
    cfg = load_config(CONFIG, argv)
    use_cpu_if_no_cuda(cfg)
    cfg.freeze()
    default_setup(cfg, type("Args", (), {"config_file": CONFIG, "eval_only": False, "opts": argv})())
    prepare_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return cfg


def main(argv=None) -> int:
    """Run the quickstart; a bad override or a busy ``OUTPUT_DIR``: one ``ERROR:`` line, exit status 2.

    ``argv``: the config overrides; None (the ``pvt-d2-quickstart`` command, ``tools/quickstart.py``) takes
    them from the command line.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        output_dir = load_config(CONFIG, argv).OUTPUT_DIR
        with OutputDirLock(output_dir, "quickstart"):
            return _run(argv)
    except (ConfigError, OutputDirError) as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 2


def _run(argv) -> int:
    start = time.time()
    cfg = setup(argv)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    vis = draw_validation_images(cfg, os.path.join(cfg.OUTPUT_DIR, "vis"))
    plots = []
    try:
        from pvt_d2.utils.plot import plot_metrics
        plots = plot_metrics(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), os.path.join(cfg.OUTPUT_DIR, "plots"))
    except ImportError:
        pass
    from pvt_d2.cli.eval_report import report_for_run

    report = report_for_run(cfg.OUTPUT_DIR)
    dataset = cfg.DATASETS.TEST[0]
    summary = {
        "box_AP": results[dataset]["bbox"]["AP"] if dataset in results else results["bbox"]["AP"],
        "mask_AP": (results[dataset] if dataset in results else results).get("segm", {}).get("AP"),
        "minutes": round((time.time() - start) / 60, 2),
        "weights": weights,
        "visualizations": vis,
        "plots": plots,
        "report": report,
    }
    with open(os.path.join(cfg.OUTPUT_DIR, "quickstart_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n== pvt_d2 quickstart ==")
    print(f"box AP {summary['box_AP']:.1f} | mask AP {summary['mask_AP']:.1f} | {summary['minutes']} min")
    print(f"weights: {weights}")
    print(f"detections drawn: {os.path.dirname(vis[0]) if vis else '-'} ({len(vis)} images)")
    if plots:
        print(f"training curves: {os.path.dirname(plots[0])}")
    if report:
        print(f"evaluation report (open in a browser): {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
