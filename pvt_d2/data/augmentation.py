"""The papers' 3x training augmentation as a detectron2 ``Augmentation``.

The official 3x configs of PVT v2, Twins and GC ViT (e.g. whai362/PVT
``detection/configs/mask_rcnn_pvt_v2_b2_fpn_3x_mstrain.py``, an mmdetection
``AutoAugment`` with two policies taken from DETR) pick one of two branches per image:

* probability 1/2: resize the short side to one of 480, 512, ..., 800 (long
  side at most 1333);
* otherwise: resize the short side to 400, 500 or 600 (long side at most
  1333), crop a region whose height and width are drawn from 384..600 px
  (never more than the image), then resize as in the first branch.

A horizontal flip with probability 1/2 comes before either (its order does
not matter). Boxes are clipped to the crop and instances whose box becomes
empty are dropped by detectron2's ``filter_empty_instances`` in the mapper,
as mmdetection's ``RandomCrop`` drops them. Bitmasks are cropped with the
image; polygons are shifted by the crop offset and not clipped
(:class:`PolygonShiftCropTransform`, as mmdetection's ``PolygonMasks.crop``):
their rasterisation inside the clipped box clips them, so no polygon-clipping
library (shapely) is needed. ``INPUT.AUGMENTATION "official_3x"`` selects it;
:func:`build_train_augmentation` builds the list the mapper uses.
"""
from typing import List, Sequence, Tuple

import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = ["PolygonShiftCropTransform", "ResizeOrResizeCropResize", "build_train_augmentation", "AUGMENTATIONS"]

AUGMENTATIONS = ("default", "official_3x")


class PolygonShiftCropTransform(T.CropTransform):
    """A crop whose polygons are only shifted by the crop offset (parts outside the crop are kept).

    detectron2's ``CropTransform`` intersects polygons with the crop window
    using shapely; mmdetection, which the papers used, shifts them and lets
    the rasterisation clip them. Images, bitmasks, boxes and points are
    cropped as by ``CropTransform``.
    """

    def apply_polygons(self, polygons: List[np.ndarray]) -> List[np.ndarray]:
        return [self.apply_coords(np.asarray(p, dtype=float).copy()) for p in polygons]


class ResizeOrResizeCropResize(T.Augmentation):
    """One of two branches per image: a multi-scale resize, or resize -> random crop -> multi-scale resize.

    Args:
        short_edges: short-side lengths of the final resize (one drawn per image).
        max_size: longest side after every resize.
        crop_prob: probability of the crop branch.
        short_edges_before_crop: short-side lengths of the resize before the crop.
        crop_size: ``(min, max)``: crop height and width are drawn uniformly from
            ``[min, min(max, side)]`` (detectron2's and mmdetection's "absolute_range").
        interp: PIL interpolation of the resizes.
    """

    def __init__(self, short_edges: Sequence[int], max_size: int = 1333, crop_prob: float = 0.5,
                 short_edges_before_crop: Sequence[int] = (400, 500, 600),
                 crop_size: Tuple[int, int] = (384, 600), interp: int = Image.BILINEAR):
        super().__init__()
        if not 0.0 <= crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be in [0, 1], got {crop_prob}")
        if len(crop_size) != 2 or not 0 < crop_size[0] <= crop_size[1]:
            raise ValueError(f"crop_size must be (min, max) with 0 < min <= max, got {tuple(crop_size)}")
        if not short_edges or not short_edges_before_crop:
            raise ValueError("short_edges and short_edges_before_crop must not be empty")
        self.short_edges = tuple(int(s) for s in short_edges)
        self.short_edges_before_crop = tuple(int(s) for s in short_edges_before_crop)
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.max_size = int(max_size)
        self.crop_prob = float(crop_prob)
        self.interp = interp

    def _resize(self, h: int, w: int, choices: Tuple[int, ...]) -> T.ResizeTransform:
        short = int(np.random.choice(choices))
        new_h, new_w = T.ResizeShortestEdge.get_output_shape(h, w, short, self.max_size)
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)

    def _crop(self, h: int, w: int) -> PolygonShiftCropTransform:
        crop_h = np.random.randint(min(h, self.crop_size[0]), min(h, self.crop_size[1]) + 1)
        crop_w = np.random.randint(min(w, self.crop_size[0]), min(w, self.crop_size[1]) + 1)
        y0 = np.random.randint(h - crop_h + 1)
        x0 = np.random.randint(w - crop_w + 1)
        return PolygonShiftCropTransform(x0, y0, crop_w, crop_h, orig_w=w, orig_h=h)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        if np.random.rand() >= self.crop_prob:
            return self._resize(h, w, self.short_edges)
        first = self._resize(h, w, self.short_edges_before_crop)
        crop = self._crop(first.new_h, first.new_w)
        return T.TransformList([first, crop, self._resize(crop.h, crop.w, self.short_edges)])


def build_train_augmentation(cfg) -> List[T.Augmentation]:
    """The training augmentations named by ``INPUT.AUGMENTATION``.

    ``"default"``: detectron2's (``ResizeShortestEdge`` on ``INPUT.MIN_SIZE_TRAIN``
    and a horizontal flip). ``"official_3x"``: :class:`ResizeOrResizeCropResize`
    with ``INPUT.MIN_SIZE_TRAIN`` / ``MAX_SIZE_TRAIN`` as the final resize and
    ``INPUT.OFFICIAL_3X`` for the crop branch, then the horizontal flip.

    Raises:
        ValueError: an unknown ``INPUT.AUGMENTATION``.
    """
    from detectron2.data.detection_utils import build_augmentation

    name = cfg.INPUT.AUGMENTATION
    if name == "default":
        return build_augmentation(cfg, is_train=True)
    if name != "official_3x":
        raise ValueError(f"INPUT.AUGMENTATION must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING != "choice":
        raise ValueError("INPUT.AUGMENTATION 'official_3x' draws INPUT.MIN_SIZE_TRAIN by 'choice'; "
                         f"got INPUT.MIN_SIZE_TRAIN_SAMPLING {cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING!r}")
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
    crop = cfg.INPUT.OFFICIAL_3X
    augs: List[T.Augmentation] = [ResizeOrResizeCropResize(
        sizes, cfg.INPUT.MAX_SIZE_TRAIN, crop.CROP_PROB, crop.RESIZE_BEFORE_CROP, tuple(crop.CROP_SIZE))]
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs
