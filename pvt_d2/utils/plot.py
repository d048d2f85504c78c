"""Training curves from a detectron2 ``metrics.json``.

detectron2's ``JSONWriter`` appends one JSON object per logging step to
``<OUTPUT_DIR>/metrics.json``: training lines carry ``iteration``, the losses
(``total_loss``, ``loss_*``), ``lr`` and timings; evaluation lines carry
``iteration`` and the COCO metrics as ``<task>/<metric>`` keys (``bbox/AP``,
``bbox/AP50``, ``segm/AP``, ...). :func:`plot_metrics` draws them as PNG
files with matplotlib's Agg renderer (no display needed; the global
matplotlib backend is left untouched).
"""
import json
import logging
import os
import re
from collections import defaultdict
from typing import Dict, List, Tuple

__all__ = ["load_metrics", "metric_series", "plot_metrics"]

logger = logging.getLogger(__name__)

# COCO summary metrics drawn per task (per-category "bbox/AP-<class>" keys are not).
AP_METRICS = ("AP", "AP50", "AP75")
_AP_KEY = re.compile(r"^(?P<task>[A-Za-z0-9_]+)/(?P<metric>AP(50|75|s|m|l)?)$")


def load_metrics(path: str) -> List[Dict]:
    """The JSON objects of a ``metrics.json`` file, in file order.

    Lines that are not valid JSON objects (e.g. a line cut short by a killed
    run) are skipped with a warning.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file not found: {path}")
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                bad += 1
    if bad:
        logger.warning(f"{path}: skipped {bad} line(s) that are not JSON objects")
    return records


def metric_series(records: List[Dict]) -> Dict[str, Tuple[List[int], List[float]]]:
    """``key -> (iterations, values)`` for every numeric key, sorted by iteration.

    A resumed run writes some iterations again; the last value written for an
    iteration wins.
    """
    by_key: Dict[str, Dict[int, float]] = defaultdict(dict)
    for record in records:
        if "iteration" not in record:
            continue
        it = int(record["iteration"])
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_key[key][it] = float(value)
    return {key: (sorted(points), [points[i] for i in sorted(points)]) for key, points in by_key.items()}


def _save_plot(series: Dict[str, Tuple[List[int], List[float]]], keys: List[str], title: str, ylabel: str,
               path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key in keys:
        its, values = series[key]
        ax.plot(its, values, label=key, marker="o" if len(its) < 20 else None, linewidth=1.5)
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_metrics(metrics_json_path: str, out_dir: str) -> List[str]:
    """Draw the curves of a run's ``metrics.json`` into ``out_dir``.

    Writes, when the data is present: ``losses.png`` (``total_loss`` and every
    ``loss_*``), ``lr.png`` (learning rate) and ``ap.png`` (``AP``, ``AP50``
    and ``AP75`` of every evaluated task, e.g. ``bbox`` and ``segm``).

    Args:
        metrics_json_path: a detectron2 ``metrics.json`` (JSON lines).
        out_dir: folder for the PNG files (created if needed).

    Returns:
        paths of the PNG files written (empty if nothing could be plotted).

    Raises:
        FileNotFoundError: the metrics file does not exist.
    """
    series = metric_series(load_metrics(metrics_json_path))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    loss_keys = sorted(k for k in series if k == "total_loss" or k.startswith("loss_"))
    if loss_keys:
        written.append(_save_plot(series, loss_keys, "Training losses", "loss",
                                  os.path.join(out_dir, "losses.png")))
    if "lr" in series:
        written.append(_save_plot(series, ["lr"], "Learning rate", "lr", os.path.join(out_dir, "lr.png")))
    ap_keys = []
    for key in sorted(series):
        m = _AP_KEY.match(key)
        if m and m.group("metric") in AP_METRICS:
            ap_keys.append(key)
    if ap_keys:
        written.append(_save_plot(series, ap_keys, "COCO AP", "AP (%)", os.path.join(out_dir, "ap.png")))
    if not written:
        logger.warning(f"{metrics_json_path}: no losses, learning rate or AP entries to plot")
    return written
