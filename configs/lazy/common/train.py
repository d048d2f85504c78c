"""detectron2's common/train.py with pvt_d2's defaults: mixed precision, a checkpoint every 5000 iterations,
one evaluation after the last iteration. ``train.init_checkpoint`` (detectron2's MODEL.WEIGHTS) loads a whole
detector; the backbone's ImageNet weights are ``model.backbone.bottom_up.pretrained``."""
from detectron2 import model_zoo

train = model_zoo.get_config("common/train.py").train
train.amp.enabled = True
train.checkpointer.period = 5000
train.eval_period = 0
train.seed = -1
