"""Tests of what every family takes from ``PyramidBackbone`` (base.py): level names, drop-path schedule, stage loop."""
import pytest
import torch
from timm.layers import DropPath
from torch import nn

from pvt_d2.modeling.backbone import create_backbone, list_architectures
from pvt_d2.modeling.backbone.base import (
    DEFAULT_OUT_FEATURES,
    LEVEL_NAMES,
    LEVEL_STRIDES,
    PyramidBackbone,
    drop_path_rates,
)


def test_level_names_and_strides():
    assert LEVEL_NAMES == ("res2", "res3", "res4", "res5", "res6")
    assert LEVEL_STRIDES == {"res2": 4, "res3": 8, "res4": 16, "res5": 32, "res6": 64}
    assert DEFAULT_OUT_FEATURES == ("res2", "res3", "res4", "res5")


def test_drop_path_rates_linear_over_all_blocks_split_by_stage():
    rates = drop_path_rates(0.3, (2, 3, 1))
    assert [len(r) for r in rates] == [2, 3, 1]
    flat = [r for stage in rates for r in stage]
    assert flat == torch.linspace(0, 0.3, 6).tolist()  # float32 linspace, bit for bit
    assert flat[0] == 0.0 and flat[-1] == pytest.approx(0.3)
    assert drop_path_rates(0.0, (2, 2)) == [[0.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("name", list_architectures())
def test_every_variant_builds_on_the_meta_device(name):
    """No host copy of a tensor while building (the drop-path schedule is computed on the CPU)."""
    with torch.device("meta"):
        model = create_backbone(name, drop_path_rate=0.2)
    assert all(p.is_meta for p in model.parameters())
    shapes = model.output_shape()
    assert {k: s.stride for k, s in shapes.items()} == {k: LEVEL_STRIDES[k] for k in DEFAULT_OUT_FEATURES}
    probs = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert probs and max(probs) == pytest.approx(0.2) and probs == sorted(probs)


def test_pvt_v2_blocks_follow_the_schedule():
    model = create_backbone("pvt_v2_b0", drop_path_rate=0.4)
    expected = drop_path_rates(0.4, (2, 2, 2, 2))
    got = [[blk.drop_path.drop_prob if isinstance(blk.drop_path, DropPath) else 0.0 for blk in stage.blocks]
           for stage in model.stages]
    assert got == expected


def test_run_stages_stops_at_the_last_level_asked_for():
    calls = []

    class Stage(nn.Module):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, x):
            calls.append(self.i)
            return x + 1

    stages = [Stage(i) for i in range(4)]
    out = PyramidBackbone.run_stages(torch.zeros(1), stages, ["res3"])
    assert calls == [0, 1] and sorted(out) == ["res2", "res3"] and out["res3"].item() == 2
    calls.clear()
    out = PyramidBackbone.run_stages(torch.zeros(1), stages, ["res5", "res2"])
    assert calls == [0, 1, 2, 3] and out["res5"].item() == 4
    calls.clear()
    out = PyramidBackbone.run_stages(torch.zeros(1), stages[:2], ["res5"], names=LEVEL_NAMES[2:])
    assert calls == [0, 1] and sorted(out) == ["res4", "res5"]
