"""Your own datasets, declared in one string: a COCO json or a Pascal VOC folder.

A dataset is declared as ``NAME=SPEC``, on the command line of the tools
(``--dataset NAME=SPEC``, repeatable) or in the config (``DATASETS.CUSTOM``, a
list of such strings):

* ``NAME=path/annotations.json:path/images`` -- COCO instances json; the
  image folder defaults to the json's folder when ``:path/images`` is left
  out. Category ids need not be contiguous (detectron2's COCO loader maps
  them to ``0..K-1`` in id order). Annotations without ``segmentation`` are
  box-only.
* ``NAME=path/VOCdevkit/VOC2007`` or ``NAME=path/VOC2007:SPLIT`` -- Pascal VOC
  layout (``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/SPLIT.txt``).
  Without ``:SPLIT`` every ``Annotations/*.xml`` file is used. The class names
  are the ``<object><name>`` values found in all XML files of the folder,
  sorted, so every split of one folder shares one class list; ``difficult``
  objects become ``iscrowd`` regions (ignored by training and by the COCO
  evaluation). VOC boxes are box-only.

:func:`setup_custom_datasets` registers the declared datasets with detectron2,
puts their class names into the metadata (``thing_classes``, drawn by the
demo) and writes the number of classes of the training set into the
detector's head keys (``MODEL.ROI_HEADS.NUM_CLASSES`` and
``MODEL.RETINANET.NUM_CLASSES``), refusing a different value that the config
sets explicitly. Box-only data meeting Mask R-CNN is refused with the hint to
use the Faster R-CNN or RetinaNet configs.

Safety: annotation files are data only. JSON is read with :mod:`json`; XML
with :mod:`xml.etree.ElementTree` after refusing any document type declaration
(so no entity can be defined, expanded or fetched).
"""
import functools
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .datasets import DatasetError

__all__ = ["DatasetSpec", "parse_dataset_spec", "register_dataset_spec", "setup_custom_datasets",
           "load_voc_dicts", "voc_classes", "read_voc_xml", "is_box_only", "DEFAULT_NUM_CLASSES"]

# detectron2's default for both head keys: a config that keeps it has not chosen a class count.
DEFAULT_NUM_CLASSES = 80
_HEAD_KEYS = ("MODEL.ROI_HEADS.NUM_CLASSES", "MODEL.RETINANET.NUM_CLASSES")
_SYNTAX = ("NAME=path/annotations.json:path/images (COCO json) or NAME=path/VOCfolder[:SPLIT] "
           "(Pascal VOC: Annotations/, JPEGImages/, ImageSets/Main/SPLIT.txt)")
# A document type declaration is where XML defines entities; a VOC file never needs one.
_DOCTYPE = re.compile(rb"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class DatasetSpec:
    """One declared dataset.

    Attributes:
        name: the detectron2 dataset name.
        kind: ``"coco"`` or ``"voc"``.
        path: the COCO json file, or the VOC folder (absolute).
        image_root: the image folder (absolute).
        split: the VOC split (``ImageSets/Main/<split>.txt``), or None for all files.
    """

    name: str
    kind: str
    path: str
    image_root: str
    split: Optional[str] = None

    @property
    def text(self) -> str:
        """The canonical ``NAME=SPEC`` string (absolute paths), as stored in ``DATASETS.CUSTOM``."""
        if self.kind == "coco":
            return f"{self.name}={self.path}:{self.image_root}"
        return f"{self.name}={self.path}" + (f":{self.split}" if self.split else "")


def parse_dataset_spec(text: str) -> DatasetSpec:
    """``"NAME=SPEC"`` -> :class:`DatasetSpec` (paths made absolute; nothing is read).

    Raises:
        DatasetError: a malformed declaration, naming the accepted syntax.
    """
    name, sep, spec = str(text).partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep or not name or not spec:
        raise DatasetError(f"Dataset declaration {text!r} is not NAME=SPEC; use {_SYNTAX}.")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise DatasetError(f"Dataset name {name!r} (in {text!r}) may only use letters, digits, '_', '-' and '.'.")
    coco = re.fullmatch(r"(.+?\.json)(?::(.*))?", spec, re.IGNORECASE)
    if coco:
        json_file = os.path.abspath(os.path.expanduser(coco.group(1)))
        images = coco.group(2)
        image_root = os.path.abspath(os.path.expanduser(images)) if images else os.path.dirname(json_file)
        return DatasetSpec(name, "coco", json_file, image_root)
    folder, split = spec, None
    if ":" in spec and not os.path.isdir(spec):
        folder, split = spec.rsplit(":", 1)
        if not split or "/" in split or os.sep in split:
            raise DatasetError(f"Dataset declaration {text!r}: {split!r} is not a split name; use {_SYNTAX}.")
    folder = os.path.abspath(os.path.expanduser(folder))
    return DatasetSpec(name, "voc", folder, os.path.join(folder, "JPEGImages"), split)


def _check_files(spec: DatasetSpec) -> None:
    """Raise :class:`DatasetError` naming what is missing for ``spec``."""
    if spec.kind == "coco":
        missing = [p for p in (spec.path, spec.image_root) if not os.path.exists(p)]
        if missing:
            raise DatasetError(f"Dataset '{spec.name}': {' and '.join(missing)} not found "
                               f"(declared as {spec.text}).")
        return
    if not os.path.isdir(spec.path):
        raise DatasetError(f"Dataset '{spec.name}': {spec.path} is not a folder. A file that is not a .json "
                           f"is read as a Pascal VOC folder; use {_SYNTAX}.")
    needed = [os.path.join(spec.path, "Annotations"), spec.image_root]
    if spec.split:
        needed.append(_split_file(spec.path, spec.split))
    missing = [p for p in needed if not os.path.exists(p)]
    if missing:
        raise DatasetError(f"Dataset '{spec.name}': the Pascal VOC folder {spec.path} lacks "
                           f"{', '.join(os.path.relpath(p, spec.path) for p in missing)} "
                           f"(expected Annotations/*.xml, JPEGImages/ and ImageSets/Main/<split>.txt).")


def _split_file(folder: str, split: str) -> str:
    return os.path.join(folder, "ImageSets", "Main", f"{split}.txt")


# ---------------------------------------------------------------------------------------------- COCO json
@functools.lru_cache(maxsize=16)
def _coco_summary(json_file: str, mtime: float) -> Tuple[Tuple[int, ...], Tuple[str, ...], bool]:
    """``(category ids, class names in id order, box_only)`` of a COCO json (``mtime`` keys the cache)."""
    try:
        with open(json_file, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"Cannot read the COCO json {json_file}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list) or not data["categories"]:
        raise DatasetError(f"COCO json {json_file} has no 'categories' list: it needs "
                           f"[{{\"id\": 1, \"name\": \"...\"}}, ...].")
    try:
        cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"COCO json {json_file}: every entry of 'categories' needs an integer 'id' "
                           f"and a 'name'.") from None
    ids = tuple(i for i, _ in cats)
    if len(set(ids)) != len(ids):
        raise DatasetError(f"COCO json {json_file}: category ids are not unique ({list(ids)}).")
    annotations = data.get("annotations") or []
    box_only = any(not a.get("iscrowd", 0) and not a.get("segmentation") for a in annotations
                   if isinstance(a, dict))
    return ids, tuple(n for _, n in cats), box_only


def coco_summary(json_file: str) -> Tuple[Tuple[int, ...], Tuple[str, ...], bool]:
    """Category ids, class names (in id order) and whether some object lacks a mask, of a COCO json."""
    return _coco_summary(json_file, os.path.getmtime(json_file))


# ------------------------------------------------------------------------------------------- Pascal VOC
def read_voc_xml(path: str) -> ET.Element:
    """Parse one VOC annotation file, refusing document type declarations (and so any entity).

    Raises:
        DatasetError: unreadable or malformed XML, or a file with ``<!DOCTYPE`` / ``<!ENTITY``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DatasetError(f"Cannot read VOC annotation {path}: {e}") from None
    if _DOCTYPE.search(data):
        raise DatasetError(f"VOC annotation {path} contains a DOCTYPE/ENTITY declaration; such files are "
                           f"refused (annotations are plain data).")
    try:
        return ET.fromstring(data)
    except ET.ParseError as e:
        raise DatasetError(f"VOC annotation {path} is not valid XML: {e}") from None


def _text(node: ET.Element, tag: str, path: str, default=None) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise DatasetError(f"VOC annotation {path} lacks <{tag}>.")
    return child.text.strip()


def _voc_ids(spec: DatasetSpec) -> List[str]:
    if spec.split:
        with open(_split_file(spec.path, spec.split)) as f:
            return [line.split()[0] for line in f if line.strip()]
    folder = os.path.join(spec.path, "Annotations")
    return sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.lower().endswith(".xml"))


@functools.lru_cache(maxsize=16)
def _voc_classes(folder: str, stamp: Tuple[Tuple[str, float], ...]) -> Tuple[str, ...]:
    names = set()
    for file, _ in stamp:
        root = read_voc_xml(os.path.join(folder, "Annotations", file))
        names.update(_text(obj, "name", file) for obj in root.findall("object"))
    return tuple(sorted(names))


def voc_classes(folder: str) -> Tuple[str, ...]:
    """Sorted object names over all ``Annotations/*.xml`` of a VOC folder (shared by all its splits)."""
    annotations = os.path.join(folder, "Annotations")
    files = sorted(f for f in os.listdir(annotations) if f.lower().endswith(".xml"))
    stamp = tuple((f, os.path.getmtime(os.path.join(annotations, f))) for f in files)
    return _voc_classes(folder, stamp)


def load_voc_dicts(spec: DatasetSpec, classes: Sequence[str]) -> List[Dict]:
    """detectron2 dataset dicts of a VOC split (boxes only, XYXY_ABS, integer image ids).

    VOC boxes are 1-based inclusive pixel coordinates: ``xmin``/``ymin`` are
    shifted by one, as detectron2's own ``load_voc_instances`` does.

    Raises:
        DatasetError: a listed image without annotation or image file, a
            malformed file, an unknown class name.
    """
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for image_id, file_id in enumerate(_voc_ids(spec)):
        xml_path = os.path.join(spec.path, "Annotations", f"{file_id}.xml")
        if not os.path.isfile(xml_path):
            raise DatasetError(f"Dataset '{spec.name}': {file_id} is listed but {xml_path} does not exist.")
        root = read_voc_xml(xml_path)
        file_name = _text(root, "filename", xml_path, default=f"{file_id}.jpg")
        if not os.path.exists(os.path.join(spec.image_root, file_name)):
            file_name = f"{file_id}.jpg"
        size = root.find("size")
        try:
            width, height = int(float(_text(size, "width", xml_path))), int(float(_text(size, "height", xml_path)))
        except (TypeError, ValueError, AttributeError):
            raise DatasetError(f"VOC annotation {xml_path} lacks a valid <size><width>/<height>.") from None
        annotations = []
        for obj in root.findall("object"):
            name = _text(obj, "name", xml_path)
            box = obj.find("bndbox")
            try:
                x0, y0, x1, y1 = (float(_text(box, k, xml_path)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError, AttributeError):
                raise DatasetError(f"VOC annotation {xml_path}: object '{name}' lacks a valid <bndbox>.") from None
            if name not in index:
                raise DatasetError(f"VOC annotation {xml_path}: class '{name}' is not among {list(classes)}.")
            annotations.append({
                "category_id": index[name],
                "bbox": [x0 - 1.0, y0 - 1.0, x1, y1],
                "bbox_mode": BoxMode.XYXY_ABS,
                "iscrowd": int(_text(obj, "difficult", xml_path, default="0") in ("1", "true")),
            })
        records.append({"file_name": os.path.join(spec.image_root, file_name), "image_id": image_id,
                        "height": height, "width": width, "annotations": annotations})
    return records


# ---------------------------------------------------------------------------------------- registration
def register_dataset_spec(spec) -> DatasetSpec:
    """Register one declared dataset (a :class:`DatasetSpec` or its ``NAME=SPEC`` text) with detectron2.

    Registering the same declaration again is a no-op, another declaration
    of the same name replaces the earlier one (in one Python session); the
    name of a dataset that was not declared this way (a builtin one) is refused.
    The metadata gets ``thing_classes`` (and, for COCO, the id mapping) at once,
    without loading the dataset.

    Raises:
        DatasetError: malformed declaration, missing files, unreadable annotations, a taken name.
    """
    if not isinstance(spec, DatasetSpec):
        spec = parse_dataset_spec(spec)
    if spec.name in DatasetCatalog.list():
        previous = MetadataCatalog.get(spec.name).get("custom_spec", None)
        if previous == spec.text:
            return spec
        if previous is None:
            raise DatasetError(f"Dataset name '{spec.name}' is already taken by a built-in dataset; "
                               f"choose another name for {spec.text}.")
    _check_files(spec)
    if spec.name in DatasetCatalog.list():
        DatasetCatalog.remove(spec.name)
        MetadataCatalog.remove(spec.name)
    if spec.kind == "coco":
        from detectron2.data.datasets import load_coco_json

        ids, classes, box_only = coco_summary(spec.path)
        DatasetCatalog.register(spec.name, functools.partial(load_coco_json, spec.path, spec.image_root, spec.name))
        MetadataCatalog.get(spec.name).set(
            json_file=spec.path, image_root=spec.image_root, evaluator_type="coco",
            thing_classes=list(classes), thing_dataset_id_to_contiguous_id={v: i for i, v in enumerate(ids)},
            box_only=box_only, custom_spec=spec.text)
    else:
        classes = voc_classes(spec.path)
        if not classes:
            raise DatasetError(f"Dataset '{spec.name}': no <object> in {os.path.join(spec.path, 'Annotations')}, "
                               f"so there are no classes to train.")
        DatasetCatalog.register(spec.name, functools.partial(load_voc_dicts, spec, classes))
        MetadataCatalog.get(spec.name).set(
            dirname=spec.path, split=spec.split or "", image_root=spec.image_root, evaluator_type="coco",
            thing_classes=list(classes), box_only=True, custom_spec=spec.text)
    return spec


def _explicit(cfg, key: str, opts: Sequence[str]) -> bool:
    """Whether the config (file or overrides) chose ``key`` rather than keeping detectron2's default."""
    overridden = key in list(opts)[::2]
    node = cfg
    for part in key.split("."):
        node = node[part]
    return overridden or node != DEFAULT_NUM_CLASSES


def setup_custom_datasets(cfg, specs: Iterable[str] = (), opts: Sequence[str] = (), *,
                          require_used: bool = False) -> List[str]:
    """Register ``cfg.DATASETS.CUSTOM`` plus ``specs``, and fit the config's class count to them.

    ``specs`` (e.g. from ``--dataset``) are added to ``cfg.DATASETS.CUSTOM`` in
    their canonical form, so the config written to ``OUTPUT_DIR`` reproduces
    the run. The class list comes from the declared datasets named in
    ``DATASETS.TRAIN`` (else those in ``DATASETS.TEST``, else the first one
    declared); it becomes ``MODEL.ROI_HEADS.NUM_CLASSES`` and
    ``MODEL.RETINANET.NUM_CLASSES``.

    Args:
        cfg: a mutable (not frozen) config.
        specs: extra ``NAME=SPEC`` declarations.
        opts: the command-line overrides, to tell a head key set on purpose from the default.
        require_used: refuse declared datasets that neither DATASETS.TRAIN nor DATASETS.TEST names.

    Returns:
        The names of the declared datasets.

    Raises:
        DatasetError: a bad declaration; declared datasets of one run with different class lists; a
            class count that the config sets explicitly to another value (both numbers named); box-only
            data with Mask R-CNN; unused declarations when ``require_used``.
    """
    declared = [parse_dataset_spec(s) for s in list(cfg.DATASETS.get("CUSTOM", [])) + list(specs)]
    if not declared:
        return []
    unique: Dict[str, DatasetSpec] = {}
    for spec in declared:
        if spec.name in unique and unique[spec.name] != spec:
            raise DatasetError(f"Dataset '{spec.name}' is declared twice, as {unique[spec.name].text} "
                               f"and as {spec.text}.")
        unique[spec.name] = register_dataset_spec(spec)
    if "CUSTOM" in cfg.DATASETS:
        cfg.DATASETS.CUSTOM = [s.text for s in unique.values()]
    names = list(unique)
    train = [n for n in cfg.DATASETS.TRAIN if n in unique]
    test = [n for n in cfg.DATASETS.TEST if n in unique]
    if require_used and not train and not test:
        raise DatasetError(
            f"Dataset(s) {', '.join(names)} are declared but DATASETS.TRAIN = {tuple(cfg.DATASETS.TRAIN)} and "
            f"DATASETS.TEST = {tuple(cfg.DATASETS.TEST)} name none of them; add e.g. "
            f"DATASETS.TRAIN \"('{names[0]}',)\"" + (f" DATASETS.TEST \"('{names[1]}',)\"" if len(names) > 1 else "")
            + ".")
    source = train or test or names[:1]
    classes = list(MetadataCatalog.get(source[0]).thing_classes)
    for name in set(train + test):
        other = list(MetadataCatalog.get(name).thing_classes)
        if other != classes:
            raise DatasetError(f"Datasets '{source[0]}' and '{name}' have different classes ({classes} vs "
                               f"{other}); training and evaluation sets must share one class list "
                               f"(same categories in the same id order).")
    _set_num_classes(cfg, len(classes), source[0], opts)
    _check_box_only(cfg, train + test)
    return names


def _set_num_classes(cfg, n: int, dataset: str, opts: Sequence[str]) -> None:
    from .datasets import num_classes_key

    key = num_classes_key(cfg)
    current = cfg.MODEL.RETINANET.NUM_CLASSES if key.startswith("MODEL.RETINANET") else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if current != n and _explicit(cfg, key, opts):
        raise DatasetError(f"{key} = {current} is set in the config, but dataset '{dataset}' has {n} classes; "
                           f"remove the setting (it is then taken from the dataset) or set {key} {n}.")
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = n
    cfg.MODEL.RETINANET.NUM_CLASSES = n


def is_box_only(name: str) -> bool:
    """Whether some object of a declared dataset has a box but no mask."""
    return bool(MetadataCatalog.get(name).get("box_only", False))


def _check_box_only(cfg, names: Iterable[str]) -> None:
    if not (cfg.MODEL.MASK_ON and cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"):
        return
    boxes = [n for n in names if is_box_only(n)]
    if boxes:
        raise DatasetError(
            f"Dataset '{boxes[0]}' has objects with boxes but no masks (segmentation), and this config is a "
            f"Mask R-CNN (MODEL.MASK_ON True), which needs a mask for every object. For box-only data use "
            f"configs/faster_rcnn_<variant>.yaml or configs/retinanet_<variant>.yaml, or set MODEL.MASK_ON False.")
