"""Training: the trainer, optimizer recipe and atomic checkpoints."""
from .checkpoint import AtomicCheckpointer, atomic_torch_save
from .optim import build_optimizer, param_groups
from .trainer import Trainer, create_ddp_model, use_cpu_if_no_cuda
