"""Optimizers: AdamW with weight-decay exemptions, and full-model gradient clipping."""
import itertools
from typing import Any, Dict, List

import torch
from detectron2.solver import build_optimizer as build_d2_optimizer
from torch import nn

__all__ = ["NO_DECAY_KEYWORDS", "param_groups", "build_optimizer"]

# Parameters whose name contains one of these are learned tables (position
# embeddings, attention bias tables, class tokens) and get no weight decay.
NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "relative_position_bias_table", "attention_biases",
                     "rel_pos", "skip_lam")


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Split trainable parameters into a decayed group and an exempt one.

    Exempt: every parameter with at most one dimension (norm scales and shifts,
    biases, layer-scale vectors) and the learned tables named in
    :data:`NO_DECAY_KEYWORDS`.
    """
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_KEYWORDS):
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
        return build_d2_optimizer(cfg, model)
    if name != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got '{cfg.SOLVER.OPTIMIZER}'")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    optimizer_cls = torch.optim.AdamW
    if clip.ENABLED:
        if clip.CLIP_TYPE != "full_model":
            raise ValueError(f"With AdamW, SOLVER.CLIP_GRADIENTS.CLIP_TYPE must be 'full_model', got '{clip.CLIP_TYPE}'")
        optimizer_cls = _with_full_model_clipping(optimizer_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    return optimizer_cls(param_groups(model, cfg.SOLVER.WEIGHT_DECAY), lr=cfg.SOLVER.BASE_LR,
                         betas=tuple(cfg.SOLVER.BETAS), weight_decay=cfg.SOLVER.WEIGHT_DECAY)
