"""A dataset mapper that survives bad image files and reads any common image mode.

detectron2's :class:`~detectron2.data.DatasetMapper` stops the whole data
loader (and with it a training run of several days) on the first image that
is missing, truncated or not an image at all, and turns a 16-bit image into a
white one. :class:`RobustDatasetMapper` keeps detectron2's behaviour for
everything else and changes only how an image is read:

* Image modes: grayscale, palette, RGBA / LA (alpha dropped), CMYK and
  1-bit images are converted to ``INPUT.FORMAT``; 16-bit and 32-bit integer
  images are scaled to 8 bits (``value / 257``), float images in ``[0, 1]``
  are scaled by 255 (other float images are clipped to ``[0, 255]``).
* Training: an image that cannot be read (missing file, corrupt or truncated
  data, size different from the annotation's ``width`` / ``height``) is
  logged once by file name and the reason, and the sample is skipped:
  detectron2's ``MapDataset`` then draws another image at random. If
  :data:`MAX_CONSECUTIVE_FAILURES` reads fail in a row the dataset is taken to
  be broken and :class:`BadImageError` stops the run, naming the last files.
* Inference: any unreadable image raises :class:`BadImageError` naming the
  file, since skipping an image would silently change the evaluation.
* Boxes: an annotation whose box has a non-finite coordinate or a width or
  height that is not positive is dropped (detectron2 would turn a negative
  size into a different, valid-looking box). Boxes outside the image are
  clipped and dropped when nothing is left, as in detectron2.
"""
import copy
import logging
import math
from collections import deque
from typing import Optional

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = ["BadImageError", "RobustDatasetMapper", "read_image", "MAX_CONSECUTIVE_FAILURES"]

logger = logging.getLogger(__name__)

# Reads that may fail in a row (per data-loader worker) before training stops.
MAX_CONSECUTIVE_FAILURES = 10

# Exceptions raised by a file that is missing, unreadable or not a valid image.
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                utils.SizeMismatchError)


class BadImageError(RuntimeError):
    """An image file that cannot be used; the message names the file."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map a high-bit-depth single-channel image to an 8-bit grayscale one."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(values / 257.0, 0, 255).round().astype(np.uint8))  # mode "L"
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8))
    return image


def read_image(file_name: str, format: Optional[str] = None) -> np.ndarray:
    """Read an image file into an ``HxWxC`` uint8 array in ``format`` (as detectron2's ``read_image``).

    Unlike detectron2's reader, 16/32-bit integer and float images keep their
    contrast (see the module docstring) and the whole file is decoded here, so
    a truncated file fails now rather than later.

    Raises:
        OSError, SyntaxError, ValueError: the file is missing or not a decodable image.
    """
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF data: keep the pixels as stored
        pass
    return utils.convert_PIL_to_numpy(_to_8bit(image), format)


def has_valid_box(annotation: dict) -> bool:
    """Whether an annotation's box has finite coordinates and a positive width and height."""
    box = annotation.get("bbox")
    if box is None:
        return True
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return False
    x0, y0, x1, y1 = BoxMode.convert(list(box), annotation.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
    return x1 > x0 and y1 > y0


class RobustDatasetMapper(DatasetMapper):
    """:class:`~detectron2.data.DatasetMapper` with tolerant image reading (see the module docstring).

    Built like detectron2's mapper: ``RobustDatasetMapper(cfg, is_train)``.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        if is_train and cfg.INPUT.get("AUGMENTATION", "default") != "default":
            from .augmentation import build_train_augmentation  # INPUT.AUGMENTATION, e.g. "official_3x"

            ret["augmentations"] = build_train_augmentation(cfg)
        return ret

    def __init__(self, *args, max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_consecutive_failures = max_consecutive_failures
        self._recent_failures = deque(maxlen=3)
        self._consecutive_failures = 0
        self._reported = set()

    def _read(self, dataset_dict: dict) -> np.ndarray:
        file_name = dataset_dict["file_name"]
        try:
            image = read_image(file_name, format=self.image_format)
            utils.check_image_size(dataset_dict, image)
        except _READ_ERRORS as e:
            if isinstance(e, FileNotFoundError):
                reason = "No such file"
            elif isinstance(e, utils.SizeMismatchError):
                reason = str(e).replace(f" for image {file_name}", "")
            else:
                reason = f"{type(e).__name__}: {e}"
            raise BadImageError(f"Cannot use image {file_name}: {reason.rstrip('.')}") from e
        return image

    def _skip(self, dataset_dict: dict, error: BadImageError) -> None:
        """Record a failed read; raise once too many have failed in a row."""
        file_name = dataset_dict["file_name"]
        self._consecutive_failures += 1
        self._recent_failures.append(file_name)
        if file_name not in self._reported:
            self._reported.add(file_name)
            logger.warning(f"{error}. Skipping it and training on another image.")
        if self._consecutive_failures >= self.max_consecutive_failures:
            raise BadImageError(
                f"{self._consecutive_failures} images in a row could not be read (last: "
                f"{', '.join(self._recent_failures)}; last error: {error}). The dataset looks broken: check "
                f"that its image folder matches its annotation file and that the files are complete.")

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        dataset_dict["annotations"] = [a for a in dataset_dict["annotations"] if has_valid_box(a)]
        super()._transform_annotations(dataset_dict, transforms, image_shape)

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        """Map one dataset dict to the model's input; ``None`` (training only) skips a bad image."""
        dataset_dict = copy.deepcopy(dataset_dict)
        try:
            image = self._read(dataset_dict)
        except BadImageError as e:
            if not self.is_train:
                raise
            self._skip(dataset_dict, e)
            return None
        self._consecutive_failures = 0

        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk)

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
