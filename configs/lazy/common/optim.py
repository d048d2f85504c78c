"""The papers' optimizer: AdamW, weight decay exempting norms, biases and the parameters a backbone declares
(:func:`pvt_d2.engine.optim.param_groups`). ``optimizer.params.model`` is set by the training script."""
import torch
from detectron2.config import LazyCall as L

from pvt_d2.engine.optim import param_groups

optimizer = L(torch.optim.AdamW)(
    params=L(param_groups)(weight_decay="${..weight_decay}"),
    lr=1e-4,
    betas=[0.9, 0.999],
    weight_decay=1e-4,
)
