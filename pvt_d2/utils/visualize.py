"""Draw detections and ground truth on images with detectron2's Visualizer."""

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_instances", "draw_dataset_dict"]


def draw_instances(image_rgb: np.ndarray, instances: Instances, metadata=None,
                   score_threshold: float = 0.5) -> np.ndarray:
    """Boxes, masks, class names and scores of ``instances`` above ``score_threshold``.

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB image.
        instances: predictions on the CPU, in image coordinates.
        metadata: detectron2 metadata providing ``thing_classes``.
        score_threshold: instances scoring lower are not drawn.

    Returns:
        the drawn ``(H, W, 3)`` uint8 RGB image.
    """
    if instances.has("scores"):
        instances = instances[instances.scores >= score_threshold]
    vis = Visualizer(image_rgb, metadata or MetadataCatalog.get("__unused"), instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(instances).get_image()


def draw_dataset_dict(image_rgb: np.ndarray, record: dict, metadata=None) -> np.ndarray:
    """Ground-truth annotations of a detectron2 dataset record."""
    vis = Visualizer(image_rgb, metadata or MetadataCatalog.get("__unused"))
    return vis.draw_dataset_dict(record).get_image()
