"""Activation checkpointing (``MODEL.PVT_D2.ACTIVATION_CHECKPOINT``) for every family.

Gradients with and without checkpointing must agree (float64, the smallest
variant of each family), also with stochastic depth on: non-reentrant
``torch.utils.checkpoint`` restores the RNG state before recomputing, so the
recomputed blocks drop the same samples. In eval mode, or without autograd,
checkpointing must not run at all.
"""
import pytest
import torch

from pvt_d2.config import get_pvt_d2_cfg
from pvt_d2.modeling.backbone import build_pvt_d2_backbone, create_backbone
from pvt_d2.modeling.backbone.base import checkpoint_block
from detectron2.layers import ShapeSpec

# (variant, input side): the smallest variant of each family at a small size.
FAMILIES = [("pvt_tiny", 64), ("pvt_v2_b0", 64), ("twins_pcpvt_small", 64), ("twins_svt_small", 64),
            ("levit_128s", 64), pytest.param("gcvit_xxtiny", 64, marks=pytest.mark.slow), ("vip_s14", 64)]


def _blocks(model):
    return [m for m in model.modules() if m is not model and hasattr(type(m), "act_checkpoint")]


def _grads(model, x, seed):
    """Parameter gradients of a fixed random projection of every output level."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    gen = torch.Generator().manual_seed(1)
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum() for v in out.values())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, out


class _Counter:
    """Counts the forward runs of every block (forward hooks do not fire on recomputation)."""

    def __init__(self, model):
        self.calls = 0
        self.blocks = _blocks(model)
        for block in self.blocks:
            block.forward = self._wrap(block.forward)

    def _wrap(self, forward):
        def counted(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)
        return counted

    def remove(self):
        for block in self.blocks:
            del block.forward


@pytest.mark.parametrize("drop_path", [0.0, 0.3])
@pytest.mark.parametrize("name,side", FAMILIES)
def test_gradients_equal_with_and_without_checkpointing(name, side, drop_path):
    torch.manual_seed(0)
    model = create_backbone(name, drop_path_rate=drop_path).double().train()
    assert _blocks(model), f"{name} has no checkpointable blocks"
    x = torch.randn(2, 3, side, side + 16, dtype=torch.float64)

    counter = _Counter(model)
    ref_grads, ref_out = _grads(model, x, seed=123)
    plain_calls, counter.calls = counter.calls, 0
    model.set_act_checkpoint(True)
    grads, out = _grads(model, x, seed=123)
    counter.remove()

    # every block that ran ran twice: once in forward, once recomputed in backward
    assert plain_calls > 0 and counter.calls == 2 * plain_calls
    for k in ref_out:
        torch.testing.assert_close(out[k], ref_out[k], rtol=0, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_drop_path_draws_differ_between_seeds_but_not_on_recompute():
    """With drop path on, another seed gives other gradients, so the equality above is not vacuous."""
    torch.manual_seed(0)
    model = create_backbone("pvt_v2_b0", drop_path_rate=0.5).double().train().set_act_checkpoint(True)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    g1, _ = _grads(model, x, seed=1)
    g1_again, _ = _grads(model, x, seed=1)
    g2, _ = _grads(model, x, seed=2)
    assert all(torch.equal(g1[n], g1_again[n]) for n in g1)
    assert any(not torch.allclose(g1[n], g2[n]) for n in g1)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "twins_svt_small", "gcvit_xxtiny"])
def test_no_effect_in_eval_or_without_grad(name):
    torch.manual_seed(0)
    model = create_backbone(name, act_checkpoint=True).eval()
    assert model.act_checkpoint and all(b.act_checkpoint for b in _blocks(model))
    counter = _Counter(model)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    out = model(x)
    sum(v.sum() for v in out.values()).backward()  # eval: no recomputation
    eval_calls, counter.calls = counter.calls, 0
    model.train()
    with torch.no_grad():
        model(x)
    assert counter.calls == eval_calls  # no autograd: no recomputation
    counter.calls = 0
    out = model(x)
    sum(v.sum() for v in out.values()).backward()
    assert counter.calls == 2 * eval_calls  # training with autograd: recomputed
    counter.remove()


def test_off_by_default_and_can_be_turned_off():
    model = create_backbone("pvt_tiny")
    assert not model.act_checkpoint and not any(b.act_checkpoint for b in _blocks(model))
    model.set_act_checkpoint(True).set_act_checkpoint(False)
    assert not any(b.act_checkpoint for b in _blocks(model))


def test_config_key_reaches_the_backbone():
    cfg = get_pvt_d2_cfg()
    assert cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT is False
    cfg.MODEL.PVT_D2.ARCH = "pvt_v2_b0"
    cfg.MODEL.PVT_D2.ACTIVATION_CHECKPOINT = True
    model = build_pvt_d2_backbone(cfg, ShapeSpec(channels=3))
    assert model.act_checkpoint and all(b.act_checkpoint for b in _blocks(model))


def test_checkpoint_block_is_a_plain_call_for_unmarked_modules():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    assert torch.equal(checkpoint_block(lin, x), lin(x))
