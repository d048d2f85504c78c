"""Checks of a COCO-format annotation file before training, each failure a :class:`DatasetError`.

detectron2 trusts its annotation files: a truncated json is a bare
``JSONDecodeError``, boxes given as strings are dropped silently (the run
"succeeds" on zero instances), duplicate image ids merge two images, one NaN
in a polygon makes mask rasterization allocate without bound, and box-only
annotations under ``MODEL.MASK_ON`` die in the ROI heads. :func:`check_coco_json`
reads the file once and refuses all of these, naming the file and the field
(``images[3].height``, ``annotations[17].bbox``); :func:`check_datasets` compares
what the files hold with what the detector trains (masks, mask format), for a
YAML config through :func:`check_datasets_for_config` and for a LazyConfig
through :func:`pvt_d2.lazy.check_lazy_datasets`.

Checked: the file exists, is complete valid json and a mapping; ``images`` and
``categories`` are present, non-empty lists; each image has an ``id`` (unique),
a ``file_name`` and positive integer ``width`` / ``height``; each annotation's
``bbox`` is four finite numbers and its polygons hold finite numbers; polygons
with fewer than 3 points are counted and reported (detectron2 drops them).
"""
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

from detectron2.data import MetadataCatalog

from .datasets import DatasetError

__all__ = ["CocoJsonSummary", "MaskNeeds", "check_coco_json", "check_datasets", "check_datasets_for_config"]

logger = logging.getLogger(__name__)

# Checked files, by (path, size, mtime): a file is read once per process.
_CACHE: Dict[Tuple[str, int, float], "CocoJsonSummary"] = {}


@dataclass
class CocoJsonSummary:
    """What :func:`check_coco_json` found in a file that passed."""

    path: str
    num_images: int = 0
    num_annotations: int = 0
    with_polygons: int = 0
    with_rle: int = 0
    without_segmentation: int = 0
    short_polygons: int = 0
    examples: Dict[str, str] = field(default_factory=dict)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_image(path: str, i: int, image) -> None:
    where = f"{path}: images[{i}]"
    if not isinstance(image, dict):
        raise DatasetError(f"{where} is a {type(image).__name__}, not an object with id, file_name, width, height")
    for key in ("id", "file_name", "width", "height"):
        if key not in image:
            raise DatasetError(f"{where} has no '{key}' (image {image.get('file_name', image.get('id', '?'))}); "
                               f"every image needs id, file_name, width and height")
    for key in ("width", "height"):
        v = image[key]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise DatasetError(f"{where}.{key} = {v!r} (image {image['file_name']}): it must be a positive integer "
                               f"(the image size in pixels)")


def _check_annotation(path: str, i: int, ann, summary: CocoJsonSummary) -> None:
    where = f"{path}: annotations[{i}]"
    if not isinstance(ann, dict):
        raise DatasetError(f"{where} is a {type(ann).__name__}, not an object")
    ident = f"(id {ann.get('id', '?')}, image_id {ann.get('image_id', '?')})"
    box = ann.get("bbox")
    if box is not None:
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DatasetError(f"{where}.bbox = {box!r} {ident}: a box is four numbers [x, y, width, height]; "
                               f"strings or other values would be dropped silently by detectron2")
        if not all(math.isfinite(v) for v in box):
            raise DatasetError(f"{where}.bbox = {box!r} {ident} has NaN or infinite coordinates")
    segm = ann.get("segmentation")
    if segm is None or segm == []:
        summary.without_segmentation += 1
        return
    if isinstance(segm, dict):
        summary.with_rle += 1
        if "counts" not in segm or "size" not in segm:
            raise DatasetError(f"{where}.segmentation {ident} is an RLE mask without 'counts' and 'size'")
        return
    if not isinstance(segm, list) or not all(isinstance(p, list) for p in segm):
        raise DatasetError(f"{where}.segmentation {ident} must be a list of polygons [[x1, y1, x2, y2, ...], ...] "
                           f"or an RLE mask {{'counts': ..., 'size': [h, w]}}")
    summary.with_polygons += 1
    for j, poly in enumerate(segm):
        if not all(_is_number(v) for v in poly):
            bad = next(v for v in poly if not _is_number(v))
            raise DatasetError(f"{where}.segmentation[{j}] {ident} holds {bad!r}: polygon coordinates must be "
                               f"numbers")
        if not all(math.isfinite(v) for v in poly):
            raise DatasetError(f"{where}.segmentation[{j}] {ident} has NaN or infinite coordinates (they would "
                               f"make mask rasterization run out of memory)")
        if len(poly) < 6 or len(poly) % 2:
            summary.short_polygons += 1
            summary.examples.setdefault("short_polygon", f"annotations[{i}].segmentation[{j}] {ident}")


def check_coco_json(path: str) -> CocoJsonSummary:
    """Check a COCO-format annotation file (see the module docstring).

    Returns:
        A :class:`CocoJsonSummary` of what it holds.

    Raises:
        DatasetError: naming the file and the field.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"Annotation file {path} does not exist")
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime)
    if key in _CACHE:
        return _CACHE[key]
    if stat.st_size == 0:
        raise DatasetError(f"Annotation file {path} is empty (0 bytes): an incomplete download or copy?")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        truncated = not raw.rstrip().endswith((b"}", b"]"))
        raise DatasetError(f"Annotation file {path} is not valid json: {e.msg} at line {e.lineno}, column {e.colno}"
                           + (" (the file ends early: truncated?)" if truncated else "")) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"Annotation file {path} is not a text json file ({e.reason})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"Annotation file {path} holds a json {type(data).__name__}, not the COCO object with "
                           f"'images', 'annotations' and 'categories'")
    for key_name in ("images", "categories"):
        if key_name not in data:
            raise DatasetError(f"Annotation file {path} has no '{key_name}' field (it has: "
                               f"{', '.join(sorted(data)) or 'nothing'}); a COCO file needs images, annotations "
                               f"and categories")
        if not isinstance(data[key_name], list):
            raise DatasetError(f"{path}: '{key_name}' must be a list, not a {type(data[key_name]).__name__}")
    if not data["categories"]:
        raise DatasetError(f"{path}: 'categories' is empty: no class is defined")
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise DatasetError(f"{path}: categories[{i}] = {cat!r} needs an 'id' and a 'name'")
    summary = CocoJsonSummary(path=path, num_images=len(data["images"]))
    for i, image in enumerate(data["images"]):
        _check_image(path, i, image)
    counts = Counter(image["id"] for image in data["images"])
    duplicates = [k for k, n in counts.items() if n > 1]
    if duplicates:
        files = [image["file_name"] for image in data["images"] if image["id"] == duplicates[0]]
        raise DatasetError(f"{path}: {len(duplicates)} image id(s) are used more than once (e.g. id {duplicates[0]} "
                           f"for {', '.join(map(str, files[:3]))}); detectron2 would merge those images. Give every "
                           f"image its own id")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DatasetError(f"{path}: 'annotations' must be a list, not a {type(annotations).__name__}")
    summary.num_annotations = len(annotations)
    for i, ann in enumerate(annotations):
        _check_annotation(path, i, ann, summary)
    if summary.short_polygons:
        logger.warning(f"{path}: {summary.short_polygons} polygon(s) have fewer than 3 points (e.g. "
                       f"{summary.examples['short_polygon']}); detectron2 leaves them out.")
    _CACHE[key] = summary
    return summary


@dataclass(frozen=True)
class MaskNeeds:
    """What a detector needs of its datasets' masks, and the words an error uses for it.

    Attributes:
        masks: the detector has a mask head, so every instance needs a mask.
        mask_format: how the training mapper reads masks (``"polygon"`` reads polygons only, ``"bitmask"``
            polygons and RLE); None where masks are not read (evaluation sets).
        mask_head: the clause saying why masks are needed.
        boxes_only: how to train boxes only instead.
        format_key: the setting that holds ``mask_format``.
    """

    masks: bool
    mask_format: Optional[str] = "polygon"
    mask_head: str = "MODEL.MASK_ON is True"
    boxes_only: str = ("set MODEL.MASK_ON False, or use a RetinaNet or Faster R-CNN config "
                       "(configs/retinanet_*.yaml, configs/faster_rcnn_*.yaml)")
    format_key: str = "INPUT.MASK_FORMAT"


def check_datasets(names: Iterable[str], needs: MaskNeeds) -> None:
    """Check the COCO-json datasets ``names`` (those with a ``json_file``) against what a detector ``needs``.

    Used by both training paths: :func:`check_datasets_for_config` (YAML) and
    :func:`pvt_d2.lazy.check_lazy_datasets` (LazyConfig).

    Raises:
        DatasetError: a bad file (see :func:`check_coco_json`); box-only annotations while
            ``needs.masks``; RLE masks while ``needs.mask_format`` is ``polygon``.
    """
    for name in names:
        json_file = MetadataCatalog.get(name).get("json_file")
        if not json_file:
            continue
        summary = check_coco_json(json_file)
        if not needs.masks or not summary.num_annotations:
            continue
        if summary.without_segmentation:
            raise DatasetError(
                f"Dataset '{name}' ({json_file}): {summary.without_segmentation} of {summary.num_annotations} "
                f"annotations have no 'segmentation', but {needs.mask_head} (Mask R-CNN needs a mask for every "
                f"instance). To train boxes only, {needs.boxes_only}.")
        if summary.with_rle and needs.mask_format == "polygon":
            raise DatasetError(
                f"Dataset '{name}' ({json_file}) has {summary.with_rle} RLE masks but {needs.format_key} is "
                f"'polygon', which reads polygons only. Set {needs.format_key} bitmask.")


def check_datasets_for_config(cfg, names: Iterable[str]) -> None:
    """Check the COCO-json datasets ``names`` (those with a ``json_file``) against what ``cfg`` trains.

    Raises:
        DatasetError: a bad file (see :func:`check_coco_json`); box-only
            annotations while ``MODEL.MASK_ON`` is set; RLE masks while
            ``INPUT.MASK_FORMAT`` is ``polygon``.
    """
    check_datasets(names, MaskNeeds(masks=bool(cfg.MODEL.MASK_ON), mask_format=cfg.INPUT.MASK_FORMAT))
