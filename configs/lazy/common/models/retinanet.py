"""RetinaNet with a P3-P7 FPN on a pvt_d2 backbone (the model of configs/base/retinanet_1x.yaml).

detectron2's common/models/retinanet.py with the papers' choices: P6 from the
backbone's res5 by a 3x3 stride-2 conv and P7 from P6 without a ReLU
(:class:`~pvt_d2.modeling.backbone.registry.LastLevelP6P7FromC5`, whose
``in_channels`` a config file sets to its backbone's res5 channels), anchor
sizes as the YAML lists them, the L1 box loss (smooth L1 with beta 0), RGB
input. ``model.num_classes`` is the head's too.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec

from pvt_d2.modeling.backbone import create_backbone
from pvt_d2.modeling.backbone.registry import LastLevelP6P7FromC5

model = model_zoo.get_config("common/models/retinanet.py").model
model.backbone.bottom_up = L(create_backbone)(name="???", out_features=["res3", "res4", "res5"])
model.backbone.top_block = L(LastLevelP6P7FromC5)(in_channels="???", out_channels="${..out_channels}",
                                                  in_feature="res5")
model.head.input_shape = [ShapeSpec(channels="${....backbone.out_channels}")] * 5
model.head.conv_dims = ["${...backbone.out_channels}"] * 4
model.anchor_generator.sizes = [[32, 40.32, 50.80], [64, 80.63, 101.59], [128, 161.27, 203.19],
                                [256, 322.54, 406.37], [512, 645.08, 812.75]]
model.smooth_l1_beta = 0.0
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
