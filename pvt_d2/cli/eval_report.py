"""Where does a detector fail? A report of a finished COCO evaluation, opened in a browser.

    pvt-d2-report output/quickstart          # or python tools/eval_report.py; -> output/quickstart/report/index.html
    python tools/eval_report.py RUN/inference/DATASET/coco_instances_results.json --dataset NAME=ann.json:images
    python tools/eval_report.py --compare output/run_a output/run_b --output output/a_vs_b

The input is a run folder (``OUTPUT_DIR`` of ``tools/train_net.py``, the
quickstart or ``--eval-only``: it holds ``inference/<dataset>/
coco_instances_results.json`` and ``config.yaml``) or the results json
itself. The dataset is ``--dataset`` (a registered name such as
``synthetic_val``, or your own ``NAME=SPEC`` as the training tools take it),
else the first of ``DATASETS.TEST`` in the run's ``config.yaml`` (declared
``DATASETS.CUSTOM`` datasets included), else the folder name
``inference/<dataset>/``.

The report folder (``--output``, default ``<run>/report``) holds
``index.html`` (no network needed: open it from disk), ``report.json`` with
every number, and the pictures under ``img/``: the COCO summary (box and mask),
per-class AP and recall (sortable), precision-recall curves, the COCO error
breakdown (C75, C50, Loc, Sim, Oth, BG, FN) overall and per class, a confusion
matrix with a background row and column, and the images with the most missed
objects and the most false detections drawn with their ground truth.
``--compare RUN_A RUN_B`` writes the same for both runs plus their
differences and the images where they disagree most.

A folder that this tool did not write is never replaced without
``--overwrite``; the report is written beside it and moved into place at the
end, so a failure leaves the old one intact. Bad input (a missing folder, an
annotation file passed as results, results of another dataset): one
``ERROR:`` line, exit status 2.
"""
import argparse
import glob
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

__all__ = ["main", "find_results", "resolve_dataset", "report_for_run"]

RESULTS = "coco_instances_results.json"


class InputError(Exception):
    """Bad command-line input; the message is printed after ``ERROR:``."""


def find_results(path: str, dataset: Optional[str] = None) -> Tuple[str, str]:
    """``(results json, run folder)`` for a run folder or a results json.

    Raises:
        InputError: the path does not exist, or holds no results (or several, none of them for ``dataset``).
    """
    if not os.path.exists(path):
        raise InputError(f"{path} does not exist (expected a run folder or its {RESULTS})")
    if os.path.isfile(path):
        results = os.path.abspath(path)
        run = os.path.dirname(results)
        for up in (run, os.path.dirname(run), os.path.dirname(os.path.dirname(run))):
            if os.path.isfile(os.path.join(up, "config.yaml")):
                return results, up
        return results, run
    run = os.path.abspath(path)
    direct = [os.path.join(run, "inference", RESULTS), os.path.join(run, RESULTS)]
    for candidate in direct:
        if os.path.isfile(candidate):
            return candidate, run
    found = sorted(glob.glob(os.path.join(run, "inference", "*", RESULTS)))
    if dataset:
        name = dataset.split("=", 1)[0]
        found = [f for f in found if os.path.basename(os.path.dirname(f)) == name] or found
    if len(found) == 1:
        return found[0], run
    if not found:
        raise InputError(f"no {RESULTS} in {path} (looked for inference/{RESULTS}, {RESULTS} and "
                         f"inference/<dataset>/{RESULTS}); run the evaluation first (--eval-only) or pass the json")
    raise InputError(f"{path} holds results for several datasets "
                     f"({', '.join(os.path.basename(os.path.dirname(f)) for f in found)}); pass --dataset NAME "
                     f"or the json itself")


def _config_datasets(run: str) -> Tuple[List[str], List[str]]:
    """``(DATASETS.TEST, DATASETS.CUSTOM)`` of ``run/config.yaml`` (read as plain YAML data), or empty lists."""
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        return [], []
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    ds = data.get("DATASETS", {}) if isinstance(data, dict) else {}
    if not isinstance(ds, dict):
        return [], []
    test = ds.get("TEST") or []
    custom = ds.get("CUSTOM") or []
    return [str(t) for t in (test if isinstance(test, (list, tuple)) else [test])], [str(c) for c in custom]


def resolve_dataset(arg: Optional[str], run: str, results: str) -> str:
    """The registered name of the dataset the results are for (registering a ``NAME=SPEC`` or a config's
    ``DATASETS.CUSTOM``); its files are checked.

    Raises:
        InputError: an unknown name, a bad declaration, missing files, or no way to tell.
    """
    from pvt_d2.data import DatasetError, prepare_datasets
    from pvt_d2.data.custom import register_dataset_spec

    try:
        if arg and "=" in arg:
            name = register_dataset_spec(arg).name
        elif arg:
            name = arg
        else:
            test, custom = _config_datasets(run)
            for spec in custom:
                register_dataset_spec(spec)
            from_path = os.path.basename(os.path.dirname(results))
            if from_path in test:
                name = from_path
            elif test:
                name = test[0]
            else:
                from detectron2.data import DatasetCatalog

                if from_path not in DatasetCatalog.list():
                    raise InputError(f"cannot tell which dataset {results} was evaluated on (no config.yaml with "
                                     f"DATASETS.TEST beside it); pass --dataset NAME or --dataset NAME=SPEC")
                name = from_path
        prepare_datasets([name])
    except (DatasetError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    return name


def load_dataset(name: str):
    """``(COCO ground truth, image folder, json path or None)`` of a registered dataset."""
    from detectron2.data import MetadataCatalog

    from pvt_d2.data import DatasetError
    from pvt_d2.evaluation.report import ReportInputError, coco_from_dict, load_ground_truth

    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file", None)
    try:
        if json_file:
            gt = load_ground_truth(json_file)
        else:
            from detectron2.data.datasets.coco import convert_to_coco_dict

            gt = coco_from_dict(convert_to_coco_dict(name))
    except (ReportInputError, DatasetError) as e:
        raise InputError(str(e)) from None
    image_root = meta.get("image_root", None) or (os.path.dirname(json_file) if json_file else "")
    return gt, image_root, json_file


def _prepare_output(out: str, overwrite: bool, protected: List[str]) -> None:
    """Refuse an output folder that holds other files (unless ``overwrite``) or holds the inputs."""
    out = os.path.abspath(out)
    for p in protected:
        p = os.path.abspath(p)
        if p == out or p.startswith(out.rstrip(os.sep) + os.sep):
            raise InputError(f"--output {out} contains the input {p}; choose another folder")
    if os.path.exists(out):
        from pvt_d2.evaluation.html import MARKER

        if not os.path.isdir(out):
            raise InputError(f"--output {out} is a file")
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)) and not overwrite:
            raise InputError(f"{out} exists and was not written by this tool; pass --overwrite to replace it "
                             f"or choose another --output")


def _publish(tmp: str, out: str) -> None:
    """Move the finished report ``tmp`` to ``out``, replacing an earlier one only now."""
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".old-report-", dir=os.path.dirname(out))
        os.rmdir(old)
        os.rename(out, old)
    os.rename(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _shown(path: Optional[str]) -> str:
    """``path`` as the page shows it: relative to the working folder when it lies inside it."""
    if not path:
        return "(converted from the dataset)"
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def _load(path: str, dataset_arg: Optional[str]):
    results_json, run = find_results(path, dataset_arg)
    name = resolve_dataset(dataset_arg, run, results_json)
    return results_json, run, name


def _analyze(results_json: str, gt, name: str, args):
    from pvt_d2.evaluation.report import ReportInputError, analyze, load_results

    try:
        results = load_results(results_json, gt, name)
        return analyze(gt, results, name, iou_types=args.types, score_thr=args.score_thr, iou_thr=args.iou_thr,
                       progress=not args.no_progress)
    except ReportInputError as e:
        raise InputError(str(e)) from None


def _run(args) -> int:
    from pvt_d2.evaluation.html import MARKER, write_comparison, write_report

    start = time.time()
    if args.compare:
        paths = list(args.compare)
        loaded = [_load(p, args.dataset) for p in paths]
        names = {ld[2] for ld in loaded}
        if len(names) > 1:
            raise InputError(f"the two runs were evaluated on different datasets ({' and '.join(sorted(names))}); "
                             f"--compare needs one dataset (pass --dataset to name it)")
        name = loaded[0][2]
        default_out = os.path.join(loaded[0][1], "compare_" + os.path.basename(loaded[1][1].rstrip(os.sep)))
    else:
        if not args.run:
            raise InputError("name a run folder or results json, or --compare RUN_A RUN_B")
        loaded = [_load(args.run, args.dataset)]
        name = loaded[0][2]
        default_out = os.path.join(loaded[0][1], "report")
    out = os.path.abspath(args.output or default_out)
    _prepare_output(out, args.overwrite, [ld[0] for ld in loaded])
    gt, image_root, json_file = load_dataset(name)
    analyses = [_analyze(ld[0], gt, name, args) for ld in loaded]
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
    try:
        inputs: Dict[str, str] = {"dataset": name, "annotations": _shown(json_file)}
        if args.compare:
            labels = args.names or [os.path.basename(ld[1].rstrip(os.sep)) for ld in loaded]
            if labels[0] == labels[1]:
                labels = [f"A ({labels[0]})", f"B ({labels[1]})"]
            inputs.update({"A results": _shown(loaded[0][0]), "B results": _shown(loaded[1][0])})
            write_comparison(analyses[0], analyses[1], tmp, names_ab=tuple(labels), image_root=image_root,
                             metas=gt.imgs, inputs=inputs, num_images=args.num_images)
        else:
            inputs["results"] = _shown(loaded[0][0])
            write_report(analyses[0], tmp, image_root=image_root, metas=gt.imgs, inputs=inputs,
                         num_images=args.num_images)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by pvt_d2.cli.eval_report; the tool may replace this folder\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for a, ld in zip(analyses, loaded):
        s = a.summary
        text = " | ".join(f"{t} AP {100 * s[t]['AP']:.1f}" for t in a.iou_types)
        print(f"{ld[0]}: {text}")
    print(f"report: {os.path.join(out, 'index.html')} ({time.time() - start:.1f} s)")
    return 0


def report_for_run(run: str, progress: bool = False) -> Optional[str]:
    """Write ``<run>/report`` for a finished run (the quickstart's last step); its ``index.html``, or None.

    A run that cannot be reported (no results, a folder ``report`` of someone else's) prints one
    ``warning:`` line instead of failing the caller.
    """
    out = os.path.join(run, "report")
    argv = [run] + ([] if progress else ["--no-progress"])
    try:
        _run(build_parser().parse_args(argv))
    except InputError as e:
        print(f"warning: no evaluation report: {e}", file=sys.stderr)
        return None
    return os.path.join(out, "index.html")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="pvt-d2-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="run folder (OUTPUT_DIR of an evaluation) or its "
                                               "coco_instances_results.json")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="compare two evaluations on the same dataset")
    parser.add_argument("--names", nargs=2, metavar=("A", "B"), help="labels of the two runs (default: folder names)")
    parser.add_argument("--dataset", help="registered dataset name (synthetic_val, coco_2017_val, ...) or your own as "
                                          "NAME=annotations.json:images (COCO json) or NAME=VOCfolder[:SPLIT]; "
                                          "default: DATASETS.TEST of the run's config.yaml")
    parser.add_argument("--output", help="report folder (default: <run>/report; with --compare "
                                         "<RUN_A>/compare_<RUN_B name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output folder this tool did not write")
    parser.add_argument("--score-thr", type=float, default=0.5,
                        help="confusion matrix and drawn images: lowest score counted (default 0.5)")
    parser.add_argument("--iou-thr", type=float, default=0.5,
                        help="confusion matrix and drawn images: IoU of a match (default 0.5)")
    parser.add_argument("--num-images", type=int, default=8, help="images drawn per list (default 8)")
    parser.add_argument("--types", nargs="+", choices=["bbox", "segm"],
                        help="evaluations (default: bbox, plus segm when the results have masks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    """Run the command; returns the exit status (2 and one ``ERROR:`` line on bad input)."""
    args = build_parser().parse_args(argv)
    if args.compare and args.run:
        print("ERROR: pass either a run or --compare RUN_A RUN_B, not both", file=sys.stderr)
        return 2
    if not 0 < args.iou_thr < 1 or not 0 <= args.score_thr <= 1:
        print("ERROR: --iou-thr must be in (0, 1) and --score-thr in [0, 1]", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except InputError as e:
        print(f"ERROR: {e}", file=sys.stderr, flush=True)
        return 2
