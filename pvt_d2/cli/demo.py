"""Run a trained detector on images or a video and save the drawn detections.

    pvt-d2-demo --config-file configs/quickstart_pvt_v2_b0.yaml \\
        --input datasets/pvt_d2_synthetic/val --output output/demo \\
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth
    pvt-d2-demo --config-file CFG --input "photos/*.jpg" a.png --output out/ --opts MODEL.WEIGHTS W
    pvt-d2-demo --config-file CFG --input clip.mp4 --output clip_detections.mp4 --opts MODEL.WEIGHTS W

``--input`` takes image files, glob patterns, folders (their images) and
video files. Boxes, masks, class names and scores above
``--confidence-threshold`` are drawn; class names come from the metadata of
the config's first test dataset, or of ``--dataset NAME=SPEC`` (your own COCO
json or VOC folder, see ``pvt_d2/data/custom.py``). Images go to the ``--output`` folder under
their own names (or to ``--output`` itself if it names one image file and
there is one input); a video goes to ``--output`` if it names a video file,
else to ``<output>/<name>.mp4``. Inputs that are missing or cannot be read
are reported by name and skipped; the exit code is non-zero only if nothing
could be processed.

Safety: the model is built and its ``MODEL.WEIGHTS`` loaded by pvt_d2's own
checkpointer (:class:`~pvt_d2.checkpoint.AtomicCheckpointer`, strict: the
weights must be those of the config's model; a file that would run code when
unpickled, a missing file, or weights of another architecture end with one
``ERROR:`` line and exit status 2). The demo never writes over its inputs:
an ``--output`` that is an input file, or a folder that is (or is inside) an
input folder, is refused, and existing result files are kept unless
``--overwrite`` is given.
"""
import argparse
import glob
import logging
import os
import sys
from typing import List, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pvt_d2.checkpoint import CheckpointError
from pvt_d2.config import ConfigError, load_config
from pvt_d2.data import DatasetError
from pvt_d2.data.custom import setup_custom_datasets
from pvt_d2.engine import use_cpu_if_no_cuda
from pvt_d2.utils.output import OutputPathError, check_output_path
from pvt_d2.engine.predictor import Predictor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
VIDEO_CODECS = {".avi": "MJPG", ".mkv": "MJPG"}  # others: mp4v

logger = logging.getLogger("pvt_d2.demo")


def _has_ext(path: str, extensions) -> bool:
    return path.lower().endswith(extensions)


def expand_inputs(items: List[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Turn ``--input`` items into file paths.

    Returns:
        ``(paths, problems)``: existing files in the given order (folders
        expanded to their sorted image files, globs to their sorted matches,
        duplicates removed) and ``(item, reason)`` for items that gave nothing.
    """
    paths, problems, seen = [], [], set()
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if _has_ext(f, IMAGE_EXTENSIONS))
            if not found:
                problems.append((item, "folder contains no images"))
        elif os.path.exists(item):
            found = [item]
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                problems.append((item, "pattern matches no files"))
        else:
            found = []
            problems.append((item, "file not found"))
        for p in found:
            if p not in seen:
                seen.add(p)
                paths.append(p)
    return paths, problems


def setup_cfg(args):
    cfg = load_config(args.config_file, args.opts)
    declared = setup_custom_datasets(cfg, args.dataset, args.opts)
    if declared and not set(declared) & set(cfg.DATASETS.TEST):
        cfg.DATASETS.TEST = (declared[0],)  # its class names are drawn
    device_note = use_cpu_if_no_cuda(cfg)
    if device_note:
        logger.info(device_note)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.freeze()
    return cfg


def dataset_metadata(cfg):
    """Metadata (``thing_classes``) of the config's first test dataset, else its first training set."""
    from detectron2.data import MetadataCatalog

    from pvt_d2.data import register_all

    register_all()
    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    return MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")


class Demo:
    """A :class:`Predictor` plus drawing; ``run_image`` / ``run_video`` write the results."""

    def __init__(self, cfg, threshold: float, amp: str = "fp32"):
        if not cfg.MODEL.WEIGHTS:
            logger.warning("MODEL.WEIGHTS is empty: the model has random weights and its detections are noise.")
        self.predictor = Predictor(cfg, amp)
        self.metadata = dataset_metadata(cfg)
        self.threshold = threshold

    def draw(self, bgr: np.ndarray) -> Tuple[np.ndarray, int]:
        """Detect on a BGR image; returns the drawn BGR image and the number of detections drawn."""
        from pvt_d2.utils.visualize import draw_instances

        instances = self.predictor(bgr)["instances"].to("cpu")
        if instances.has("scores"):
            instances = instances[instances.scores >= self.threshold]
        drawn = draw_instances(np.ascontiguousarray(bgr[:, :, ::-1]), instances, self.metadata,
                               score_threshold=self.threshold)
        return np.ascontiguousarray(drawn[:, :, ::-1]), len(instances)

    def run_image(self, path: str, out_path: str) -> int:
        from pvt_d2.data.mapper import read_image

        bgr = read_image(path, format="BGR")  # the data loader's reader: EXIF orientation, 16-bit, float, CMYK
        drawn, n = self.draw(bgr)
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        if not cv2.imwrite(out_path, drawn):
            raise OSError(f"could not write {out_path}")
        return n

    def run_video(self, path: str, out_path: str) -> int:
        """Draw every frame of ``path`` into ``out_path``; returns the number of frames written."""
        capture = cv2.VideoCapture(path)
        if not capture.isOpened():
            raise OSError("not a readable video")
        fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        writer, frames = None, 0
        try:
            with tqdm(total=total, desc=os.path.basename(path), unit="frame") as bar:
                while True:
                    ok, frame = capture.read()
                    if not ok:
                        break
                    drawn, _ = self.draw(frame)
                    if writer is None:
                        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
                        codec = VIDEO_CODECS.get(os.path.splitext(out_path)[1].lower(), "mp4v")
                        writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*codec), fps,
                                                 (drawn.shape[1], drawn.shape[0]))
                        if not writer.isOpened():
                            raise OSError(f"could not open {out_path} for writing")
                    writer.write(drawn)
                    frames += 1
                    bar.update(1)
        finally:
            capture.release()
            if writer is not None:
                writer.release()
        if frames == 0:
            raise OSError("no frame could be decoded")
        return frames


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (after resolving links)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def output_conflicts(items: List[str], paths: List[str], targets: List[str], out: str, overwrite: bool) -> List[str]:
    """Why writing ``targets`` (for ``--output out``) would destroy a file of the user's; empty if it would not.

    Args:
        items: the ``--input`` items as given (folders among them).
        paths: the input files they expanded to.
        targets: the result files that would be written.
        out: ``--output``.
        overwrite: ``--overwrite`` given (existing result files may be replaced).
    """
    problems = []
    inputs = {os.path.realpath(p) for p in paths}
    clashes = [t for t in targets if os.path.realpath(t) in inputs]
    if clashes:
        problems.append(f"--output {out} would write {', '.join(clashes[:3])}{', ...' if len(clashes) > 3 else ''} "
                        f"over the input file(s) of that name")
    for item in items:
        if os.path.isdir(item) and _inside(out, item):
            problems.append(f"--output {out} is the input folder {item} or inside it: the drawn images would "
                            f"replace or mix with the photos")
    if not problems and not overwrite:
        existing = [t for t in targets if os.path.exists(t)]
        if existing:
            problems.append(f"{len(existing)} result file(s) exist already ({', '.join(existing[:3])}"
                            f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them or choose "
                            f"another --output")
    return problems


def _unique_name(name: str, used: set) -> str:
    stem, ext = os.path.splitext(name)
    candidate, k = name, 1
    while candidate in used:
        candidate = f"{stem}_{k}{ext}"
        k += 1
    used.add(candidate)
    return candidate


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="a pvt_d2 config")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, glob patterns (quote them), folders or video files")
    parser.add_argument("--output", default="output/demo",
                        help="folder for the results, or an image / video file name for a single input "
                             "(default: output/demo)")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the detections drawn (default 0.5)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=SPEC",
                        help="your own dataset (NAME=annotations.json:images or NAME=VOCfolder[:SPLIT]) whose "
                             "class names are drawn and whose class count sizes the model")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace result files that exist already in --output (never the inputs)")
    parser.add_argument("--amp", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="precision of the backbone (autocast; heads and post-processing stay fp32): bf16 "
                             "on a CPU with AVX512-BF16/AMX or a GPU, fp16 on a GPU; falls back to fp32 with a "
                             "warning where unsupported (default fp32)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE ..., e.g. MODEL.WEIGHTS model_final.pth")
    return parser


@torch.no_grad()
def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = setup_cfg(args)
    except (ConfigError, DatasetError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    paths, problems = expand_inputs(args.input)
    for item, reason in problems:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    videos = [p for p in paths if _has_ext(p, VIDEO_EXTENSIONS)]
    images = [p for p in paths if p not in videos]
    if not paths:
        print("ERROR: no input could be processed", file=sys.stderr)
        return 1

    out = args.output
    single_image_file = _has_ext(out, IMAGE_EXTENSIONS) and len(paths) == 1 and len(images) == 1
    single_video_file = _has_ext(out, VIDEO_EXTENSIONS) and len(paths) == 1 and len(videos) == 1
    names_a_file = _has_ext(out, IMAGE_EXTENSIONS) or _has_ext(out, VIDEO_EXTENSIONS)
    if names_a_file and not (single_image_file or single_video_file):
        print(f"ERROR: --output {out} names a file, which needs exactly one input of that kind; "
              f"give a folder for {len(paths)} inputs", file=sys.stderr)
        return 2

    used = set()
    image_targets = [out if single_image_file else os.path.join(out, _unique_name(os.path.basename(p), used))
                     for p in images]
    video_targets = [out if single_video_file else
                     os.path.join(out, _unique_name(f"{os.path.splitext(os.path.basename(p))[0]}.mp4", used))
                     for p in videos]
    conflicts = output_conflicts(args.input, paths, image_targets + video_targets, out, args.overwrite)
    if conflicts:
        print(f"ERROR: {'; '.join(conflicts)}. Nothing was written.", file=sys.stderr)
        return 2
    try:  # the folder (or the file's folder) exists and is writable before any model is built
        check_output_path(out, "file" if (single_image_file or single_video_file) else "dir", what="--output",
                          create=False)
    except OutputPathError as e:
        print(f"ERROR: {e} Nothing was written.", file=sys.stderr)
        return 2

    try:
        demo = Demo(cfg, args.confidence_threshold, args.amp)
    except CheckpointError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    done, failed = [], []
    for path, target in tqdm(list(zip(images, image_targets)), desc="images", unit="img", disable=len(images) < 2):
        try:
            n = demo.run_image(path, target)
        except Exception as e:  # unreadable or corrupt file: report it, keep going
            tqdm.write(f"skipped {path}: cannot be processed ({type(e).__name__}: {e})", file=sys.stderr)
            failed.append(path)
            continue
        done.append(target)
        logger.debug(f"{path}: {n} detections -> {target}")
    for path, target in zip(videos, video_targets):
        try:
            frames = demo.run_video(path, target)
        except Exception as e:
            print(f"skipped {path}: cannot be processed ({type(e).__name__}: {e})", file=sys.stderr)
            failed.append(path)
            continue
        done.append(target)
        logger.info(f"{path}: {frames} frames -> {target}")

    skipped = len(problems) + len(failed)
    print(f"processed {len(done)} input(s), skipped {skipped}; results in "
          f"{out if (single_image_file or single_video_file) else os.path.abspath(out)}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
