"""Training: the trainer and the optimizer recipe.

Checkpointing lives one layer below, in :mod:`pvt_d2.checkpoint`;
``AtomicCheckpointer`` is re-exported here for the training scripts.
"""
from ..checkpoint import AtomicCheckpointer
from .optim import OptimizerMismatchError, build_optimizer, param_groups
from .trainer import RecipeMixin, Trainer, create_ddp_model, use_cpu_if_no_cuda

__all__ = ["AtomicCheckpointer", "OptimizerMismatchError", "RecipeMixin", "Trainer", "build_optimizer",
           "create_ddp_model", "param_groups", "use_cpu_if_no_cuda"]
