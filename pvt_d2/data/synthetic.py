"""A small, deterministic COCO-format instance-segmentation set for quick runs.

Images show a few shapes (circle, square, triangle, star), each class with a
typical colour jittered per instance, of random size and rotation on
textured backgrounds (gradients, stripes and noise).
Instances never overlap, so each polygon is exactly the visible mask. The
set is written on first use under ``<root>/pvt_d2_synthetic/`` with detectron2's
usual layout (``train/``, ``val/`` and ``annotations/instances_{split}.json``)
and registered as the detectron2 datasets ``synthetic_train`` and
``synthetic_val``. ``<root>`` is ``$DETECTRON2_DATASETS`` or ``./datasets``.
"""
import json
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional

import cv2
import numpy as np

__all__ = ["CLASSES", "SPLITS", "dataset_root", "ensure_synthetic_dataset", "register_synthetic_datasets",
           "generate_split"]

CLASSES = ("circle", "square", "triangle", "star")
# Each class has a typical colour (jittered per instance), as many real object
# classes do; shape and colour together make the set learnable in minutes.
CLASS_COLORS = ((220, 60, 60), (60, 200, 60), (60, 90, 230), (230, 210, 50))
# split name -> (number of images, random seed)
SPLITS = {"train": (240, 0), "val": (40, 1)}
FOLDER = "pvt_d2_synthetic"
FORMAT_VERSION = 2


def dataset_root(root: Optional[str] = None) -> str:
    """Folder of the synthetic set: ``<root or $DETECTRON2_DATASETS or ./datasets>/pvt_d2_synthetic``."""
    base = root or os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(base, FOLDER)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1.0)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    period = rng.uniform(6, 20)
    stripes = np.sin((xx * np.cos(angle + 1.0) + yy * np.sin(angle + 1.0)) * 2 * math.pi / period)
    img += 18 * stripes[..., None]
    img += rng.normal(0, 10, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_polygon(rng: np.random.Generator, kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "circle":
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        radii = np.full_like(angles, r)
    elif kind == "square":
        angles = rot + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        radii = np.full(4, r)
    elif kind == "triangle":
        angles = rot + np.array([0, 2 / 3, 4 / 3]) * math.pi
        radii = np.full(3, r)
    else:  # star
        angles = rot + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _draw_image(rng: np.random.Generator, image_id: int, file_name: str) -> (np.ndarray, Dict, List[Dict]):
    h, w = int(rng.integers(128, 193)), int(rng.integers(128, 193))
    img = _background(rng, h, w)
    annotations, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(20):
            r = rng.uniform(12, 34)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:
            continue
        boxes.append(box)
        cls = int(rng.integers(len(CLASSES)))
        poly = _shape_polygon(rng, CLASSES[cls], cx, cy, r)
        poly[:, 0] = poly[:, 0].clip(0, w - 1)
        poly[:, 1] = poly[:, 1].clip(0, h - 1)
        color = tuple(int(c) for c in np.clip(np.array(CLASS_COLORS[cls]) + rng.integers(-40, 41, size=3), 0, 255))
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], color)
        x0, y0 = poly.min(0)
        x1, y1 = poly.max(0)
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
        annotations.append({
            "image_id": image_id,
            "category_id": cls + 1,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(mask.sum()),
            "segmentation": [[float(v) for v in poly.reshape(-1)]],
            "iscrowd": 0,
        })
    image = {"id": image_id, "file_name": file_name, "height": h, "width": w}
    return img, image, annotations


def generate_split(out_dir: str, split: str, num_images: int, seed: int) -> str:
    """Write the images of one split and its COCO json under ``out_dir``; returns the json path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        file_name = f"{i:06d}.png"
        img, image, anns = _draw_image(rng, i + 1, file_name)
        # images are stored as BGR like every cv2-written file; the content is colour-agnostic
        cv2.imwrite(os.path.join(out_dir, split, file_name), img)
        images.append(image)
        annotations.extend(anns)
    for k, ann in enumerate(annotations):
        ann["id"] = k + 1
    coco = {
        "info": {"description": "pvt_d2 synthetic shapes", "version": FORMAT_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    json_path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def _is_complete(folder: str) -> bool:
    marker = os.path.join(folder, "COMPLETE")
    return os.path.exists(marker) and open(marker).read().strip() == str(FORMAT_VERSION)


def ensure_synthetic_dataset(root: Optional[str] = None) -> str:
    """Generate the set if it is not complete yet; returns its folder.

    The set is written to a temporary sibling folder and renamed into place,
    so concurrent processes never see it half-written.
    """
    folder = dataset_root(root)
    if _is_complete(folder):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pvt_d2_synthetic_", dir=parent)
    try:
        for split, (n, seed) in SPLITS.items():
            generate_split(tmp, split, n, seed)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write(str(FORMAT_VERSION))
        if os.path.exists(folder) and not _is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # lost a race to a broken writer: surface it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def register_synthetic_datasets(root: Optional[str] = None) -> None:
    """Register ``synthetic_train`` / ``synthetic_val``.

    Loading a split (or calling :func:`ensure_synthetic_dataset`) writes the set
    if needed. The metadata carries ``json_file`` so COCOEvaluator uses the
    real annotation file. Calling it again is cheap; if the dataset root
    (``$DETECTRON2_DATASETS``) changed since, the datasets are re-registered
    at the new place.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    folder = dataset_root(root)
    for split in SPLITS:
        name = f"synthetic_{split}"
        image_root = os.path.join(folder, split)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("image_root") == image_root:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        json_file = os.path.join(folder, "annotations", f"instances_{split}.json")

        def load(json_file=json_file, image_root=image_root, name=name):
            ensure_synthetic_dataset(os.path.dirname(folder))
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco",
                                      thing_classes=list(CLASSES), synthetic=True)
