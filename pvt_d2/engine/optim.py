"""Optimizers: AdamW with weight-decay exemptions, and full-model gradient clipping.

:func:`build_optimizer` is the one call that gives a detectron2 trainer the
optimizer a config names (``SOLVER.OPTIMIZER``). detectron2's own
``DefaultTrainer`` builds SGD whatever that key says; the first step of an
optimizer that trains a backbone built from a config asking for another
optimizer therefore stops with :class:`OptimizerMismatchError` (a
``torch.optim`` step pre-hook, installed once), never silently trains with SGD.
"""
import itertools
import logging
import weakref
from typing import Any, Dict, List, Set

import torch
from detectron2.solver import build_optimizer as build_d2_optimizer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..modeling.backbone.registry import config_optimizers

__all__ = ["no_weight_decay_names", "param_groups", "build_optimizer", "OptimizerMismatchError",
           "check_config_optimizer"]

_OPTIMIZER_CLASSES = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def no_weight_decay_names(model: nn.Module) -> Set[str]:
    """Full names of the parameters that ``model`` and its sub-modules declare free of weight decay.

    timm's convention: a module with a ``no_weight_decay()`` method returns the
    names (relative to itself) of such parameters; every pvt_d2 backbone has
    one (:meth:`~pvt_d2.modeling.backbone.base.PyramidBackbone.no_weight_decay`),
    wherever it sits in the detector (``backbone.bottom_up`` under an FPN).
    """
    names = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names.update(f"{prefix}.{n}" if prefix else n for n in declared())
    return names


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Split trainable parameters into a decayed group and an exempt one.

    Exempt: every parameter with at most one dimension (norm scales and shifts,
    biases, layer-scale vectors) and those the model declares in
    ``no_weight_decay()`` (:func:`no_weight_decay_names`: position
    embeddings, Twins' PEG convs, attention-bias tables).
    """
    # Not timm's param_groups_weight_decay: it lists the exempt group first (saved optimizer states have the decayed
    # group at 0) and merges both at weight decay 0. Not detectron2's: it exempts norm layers by type, not ndim <= 1.
    exempt_names = no_weight_decay_names(model)
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim <= 1 or name in exempt_names:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _with_full_model_clipping(optimizer_cls, max_norm: float, norm_type: float):
    """Subclass ``optimizer_cls`` so that ``step`` first clips the norm of all gradients together."""

    class FullModelClippedOptimizer(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelClippedOptimizer.__name__ = f"FullModelClipped{optimizer_cls.__name__}"
    return FullModelClippedOptimizer


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``SOLVER.OPTIMIZER``.

    ``ADAMW`` (the papers' recipe): AdamW over :func:`param_groups`, with
    ``SOLVER.CLIP_GRADIENTS`` of type ``full_model`` clipping the global
    gradient norm. ``SGD``: detectron2's default optimizer.
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        optimizer = build_d2_optimizer(cfg, model)
        _RECIPE_OPTIMIZERS.add(optimizer)
        return optimizer
    if name != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got '{cfg.SOLVER.OPTIMIZER}'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    optimizer_cls = torch.optim.AdamW
    if clip.ENABLED:
        if clip.CLIP_TYPE != "full_model":
            raise ValueError(
                f"With AdamW, SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model', got '{clip.CLIP_TYPE}'")
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    optimizer = optimizer_cls(param_groups(model, cfg.SOLVER.WEIGHT_DECAY), lr=cfg.SOLVER.BASE_LR,
                              betas=tuple(cfg.SOLVER.BETAS), weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    _RECIPE_OPTIMIZERS.add(optimizer)
    return optimizer


class OptimizerMismatchError(RuntimeError):
    """A model built from a pvt_d2 config is trained with another optimizer than its ``SOLVER.OPTIMIZER``."""


_RECIPE_OPTIMIZERS: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()  # made by build_optimizer
_CHECKED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def check_config_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse ``optimizer`` if it trains a backbone whose config named another ``SOLVER.OPTIMIZER``.

    Raises:
        OptimizerMismatchError: e.g. detectron2's ``DefaultTrainer`` SGD on an
            AdamW config; the message says how to get the config's optimizer.
    """
    if optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for backbone, wanted in config_optimizers():
        if not any(id(p) in trained for p in backbone.parameters()):
            continue
        expected = _OPTIMIZER_CLASSES.get(wanted)
        if expected is not None and not isinstance(optimizer, expected):
            raise OptimizerMismatchError(
                f"The config asks for SOLVER.OPTIMIZER {wanted} (the papers' recipe), but the model is being trained "
                f"with {type(optimizer).__name__}, which detectron2's DefaultTrainer builds for every config. Give "
                f"your trainer pvt_d2's recipe: `class MyTrainer(pvt_d2.engine.RecipeMixin, DefaultTrainer)`, or "
                f"return pvt_d2.engine.build_optimizer(cfg, model) from its build_optimizer; to train with "
                f"{type(optimizer).__name__} on purpose, set SOLVER.OPTIMIZER accordingly.")
        if wanted == "ADAMW" and optimizer not in _RECIPE_OPTIMIZERS:
            logging.getLogger("pvt_d2").warning(
                "This AdamW was not built by pvt_d2.engine.build_optimizer: the recipe's parameter groups (no "
                "weight decay on norms, biases and the tables in no_weight_decay()) may not apply.")


def _check_before_step(optimizer, args, kwargs):
    check_config_optimizer(optimizer)


register_optimizer_step_pre_hook(_check_before_step)
