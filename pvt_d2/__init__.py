"""pvt_d2: pyramid vision transformer backbones for detectron2."""
