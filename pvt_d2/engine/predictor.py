"""Inference on single images with weights loaded through pvt_d2's safe reader."""
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..checkpoint import AtomicCheckpointer, run_info_from_config
from ..utils.precision import autocast_backbone

__all__ = ["Predictor"]


class Predictor:
    """The config's detector with its ``MODEL.WEIGHTS``, run on one BGR image.

    It does what detectron2's ``DefaultPredictor`` does (resize to
    ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, channel order of
    ``INPUT.FORMAT``, results at the original size), but loads the weights
    strictly through :class:`~pvt_d2.checkpoint.AtomicCheckpointer`, so the
    file goes through the project's safe reader and must belong to this model.

    Args:
        cfg: a detectron2 config of a pvt_d2 detector.
        amp: ``"fp32"``, ``"fp16"`` or ``"bf16"``: the backbone runs under
            autocast, heads and post-processing in float32.

    Raises:
        CheckpointError: missing, unreadable or unsafe weights file, or weights of another model.
    """

    def __init__(self, cfg, amp: str = "fp32"):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        if cfg.MODEL.WEIGHTS:
            AtomicCheckpointer(self.model, strict=True, run_info=run_info_from_config(cfg)).resume_or_load(
                cfg.MODEL.WEIGHTS, resume=False)
        autocast_backbone(self.model, amp)
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT

    def __call__(self, bgr: np.ndarray) -> dict:
        """Detections of one ``(H, W, 3)`` uint8 BGR image: ``{"instances": Instances}`` at the image's size."""
        with torch.no_grad():
            image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
            height, width = image.shape[:2]
            image = self.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(image.astype("float32").transpose(2, 0, 1)))
            return self.model([{"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}])[0]
