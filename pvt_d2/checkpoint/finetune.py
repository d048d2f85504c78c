"""Fine-tuning a trained detector on data with other classes.

A pvt_d2 detector trained on COCO (80 classes) given as ``MODEL.WEIGHTS`` to a
model for, say, 3 classes: the layers whose size depends on the number of
classes cannot be loaded and are re-initialised; everything else (backbone,
FPN, RPN, box and mask heads up to their predictors) loads.

Class-dependent layers, found by module type so every detector is covered:

* ``cls_score`` of detectron2's ``FastRCNNOutputLayers`` (every stage of a
  cascade) and of the RetinaNet head;
* ``bbox_pred`` of ``FastRCNNOutputLayers`` when the box regression is
  class-specific (not ``CLS_AGNOSTIC_BBOX_REG``);
* the ``predictor`` of a mask head (``BaseMaskRCNNHead``) when masks are
  class-specific (not ``CLS_AGNOSTIC_MASK``).

:func:`reinitialise_class_heads` is called by the training checkpointer
(:class:`~pvt_d2.checkpoint.checkpointer.AtomicCheckpointer`) when it loads
``MODEL.WEIGHTS`` (never when resuming or evaluating, which must load
exactly): when the checkpoint's class-dependent tensors do not fit the model,
all of them are left out of the load and a table names them.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = ["class_dependent_keys", "reinitialise_class_heads", "ReinitReport"]

logger = logging.getLogger("pvt_d2")


def class_dependent_keys(model: nn.Module) -> Dict[str, int]:
    """State-dict keys of the layers sized by the number of classes -> the model's number of classes.

    Keys carry the model's own prefixes (e.g. ``roi_heads.box_predictor.cls_score.weight``); a
    DistributedDataParallel wrapper is looked through.
    """
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
    from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead

    model = getattr(model, "module", model)
    layers: Dict[str, Tuple[nn.Module, int]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, FastRCNNOutputLayers):
            layers[f"{prefix}cls_score"] = (module.cls_score, module.num_classes)
            box_dim = len(module.box2box_transform.weights)
            if module.bbox_pred.out_features != box_dim:  # class-specific regression
                layers[f"{prefix}bbox_pred"] = (module.bbox_pred, module.num_classes)
        elif isinstance(module, RetinaNetHead):
            layers[f"{prefix}cls_score"] = (module.cls_score, int(getattr(model, "num_classes", 0) or 0))
        elif isinstance(module, BaseMaskRCNNHead):
            predictor = getattr(module, "predictor", None)
            if isinstance(predictor, nn.Conv2d) and predictor.out_channels > 1:  # class-specific masks
                layers[f"{prefix}predictor"] = (predictor, predictor.out_channels)
    return {f"{name}.{param}": n for name, (layer, n) in layers.items() for param, _ in
            layer.named_parameters(recurse=False)}


@dataclass
class ReinitReport:
    """Which class-dependent tensors were left out of a load, and why.

    Attributes:
        rows: ``(key, checkpoint shape, model shape)`` of every re-initialised tensor.
        checkpoint_classes: the checkpoint's number of classes where it can be told, else None.
        model_classes: the model's number of classes.
    """

    rows: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    checkpoint_classes: Optional[int] = None
    model_classes: int = 0

    @property
    def keys(self) -> List[str]:
        return [k for k, _, _ in self.rows]

    def table(self, source: str = "the checkpoint") -> str:
        """A paragraph and one line per tensor, for the log."""
        classes = f"{self.checkpoint_classes} classes" if self.checkpoint_classes else "another number of classes"
        lines = [f"Fine-tuning from {source}, trained with {classes}, for {self.model_classes} classes: "
                 f"{len(self.rows)} class-dependent tensors are re-initialised, all others load:"]
        lines += [f"  {k}: re-initialised (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in self.rows]
        return "\n".join(lines)


def _checkpoint_classes(key: str, ckpt_shape, model_shape, model_classes: int) -> Optional[int]:
    """The class count a checkpoint's ``cls_score`` tensor was made for."""
    if not key.endswith("cls_score.weight") or not model_classes:
        return None
    if len(model_shape) == 2:  # Fast R-CNN: K + 1 outputs (background)
        return int(ckpt_shape[0]) - 1
    anchors = int(model_shape[0]) // model_classes  # RetinaNet: A x K output channels
    return int(ckpt_shape[0]) // anchors if anchors and ckpt_shape[0] % anchors == 0 else None


def reinitialise_class_heads(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> ReinitReport:
    """Drop the class-dependent tensors from ``weights`` when they do not fit ``model``.

    When any class-dependent tensor of the checkpoint has another shape than
    the model's (a detector trained with another number of classes), every
    class-dependent tensor is removed from ``weights`` (a dict, changed in
    place), so those layers keep their fresh initialisation; nothing else is
    touched. When all of them fit, nothing is removed and the report is empty.

    Args:
        model: the detector (detectron2 meta-architecture).
        weights: the checkpoint's ``model`` state dict, in the model's key names.

    Returns:
        What was removed.
    """
    report = ReinitReport()
    state = getattr(model, "module", model).state_dict()
    dependent = class_dependent_keys(model)
    if not dependent:
        return report
    report.model_classes = max(dependent.values())
    mismatched = [k for k in dependent if k in weights and k in state
                  and tuple(weights[k].shape) != tuple(state[k].shape)]
    if not mismatched:
        return report
    for key in dependent:
        if key in weights and key in state:
            report.rows.append((key, tuple(weights[key].shape), tuple(state[key].shape)))
            if report.checkpoint_classes is None:
                report.checkpoint_classes = _checkpoint_classes(key, weights[key].shape, state[key].shape,
                                                                report.model_classes)
            del weights[key]
    return report
