"""LeViT BatchNorm folding (the engine's FoldedLinearBN / FoldedConvBN): same function, same state dict."""
import pytest
import torch
from torch import nn

from pvt_d2.modeling.backbone import create_backbone
from pvt_d2.inference import prepare_for_inference, restore_from_inference
from pvt_d2.inference.modules import batchnorm_affine
from pvt_d2.modeling.backbone.levit import LinearBN

LEVELS = ["res2", "res3", "res4", "res5", "res6"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomized(norm: str = "FrozenBN", seed: int = 0) -> nn.Module:
    """levit_128s with random BatchNorm statistics / affines and attention biases (every fold matters)."""
    torch.manual_seed(seed)
    # fast_inference off: the plain model, nothing folded
    model = create_backbone("levit_128s", norm=norm, out_features=LEVELS, fast_inference=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("bn.weight"):
                t.copy_(1 + 0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith(("bn.bias", "bn.running_mean")):
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
            elif name.endswith("bn.running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("attention_biases"):
                t.copy_(torch.randn(t.shape, generator=g))
    return model.eval()


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def _fold(model):
    """``model`` prepared for inference, folding also while autograd records."""
    return prepare_for_inference(model, fold_batchnorm_while_recording=True)


def test_folded_eval_matches_unfolded_float32():
    model = _randomized()
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    ref = _outputs(model, x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    model = _fold(model)
    out = _outputs(model, x)
    for k in LEVELS:
        scale = ref[k].abs().max().item()
        assert scale > 0.1
        assert (out[k] - ref[k]).abs().max().item() <= 1e-5 * scale, k
    # the state dict (names and values) is untouched; no derived tensors are saved
    state = model.state_dict()
    assert set(state) == set(keys)
    assert all(torch.equal(state[k], keys[k]) for k in keys)
    # folding really happened (the projections run without their BatchNorm)
    calls = []
    handle = model.stages[0].blocks[0].attn.qkv.bn.register_forward_hook(lambda *a: calls.append(1))
    _outputs(model, x)
    handle.remove()
    assert calls == []


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_folded_eval_matches_unfolded_float64(norm):
    model = _randomized(norm).double()
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _outputs(model, x)
    out = _outputs(_fold(model), x)
    assert max((out[k] - ref[k]).abs().max().item() for k in LEVELS) < 1e-10


def test_fold_cache_follows_loaded_weights():
    model = _fold(_randomized())
    other = _randomized(seed=1)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    before = _outputs(model, x)["res5"]
    model.load_state_dict(other.state_dict())
    expected = _outputs(other, x)["res5"]
    after = _outputs(model, x)["res5"]
    assert (after - before).abs().max() > 1e-2
    assert (after - expected).abs().max() <= 1e-5 * expected.abs().max()


def _bn_calls(model, x, grad: bool) -> int:
    calls = []
    handle = model.stages[0].blocks[0].attn.qkv.bn.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.set_grad_enabled(grad):
            model(x)
    finally:
        handle.remove()
    return len(calls)


def test_fast_inference_folds_in_inference_only():
    """The default (``fast_inference`` on) folds without autograd, and keeps the BatchNorm while it records."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    model = prepare_for_inference(_randomized())
    ref = restore_from_inference(prepare_for_inference(_randomized()))
    assert _bn_calls(model, x, grad=False) == 0
    assert _bn_calls(model.train(), x, grad=True) == 1  # frozen BN in training: the plain pair
    assert _bn_calls(ref.eval(), x, grad=False) == 1
    out, expected = _outputs(model.eval(), x), _outputs(ref, x)
    for k in LEVELS:
        assert (out[k] - expected[k]).abs().max() <= 1e-5 * expected[k].abs().max(), k


def test_plain_batchnorm_in_training_mode_is_not_folded():
    layer = _fold(LinearBN(6, 4))
    assert batchnorm_affine(layer.bn) is None  # training mode: batch statistics
    x = torch.randn(5, 3, 6)
    out = layer(x)
    assert out.reshape(-1, 4).mean(0).abs().max() < 1e-5  # normalised with the batch's own statistics
    layer.eval()
    scale, shift = batchnorm_affine(layer.bn)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.linear(x) * scale + shift, atol=1e-6)


def test_frozen_bn_training_gradients_equal_with_folding():
    """Training with frozen BatchNorm folds inside the graph: same loss and gradients (float64)."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = []
    for fold in (False, True):
        model = _randomized().double().train()
        model = _fold(model) if fold else model
        out = model(x)
        sum(v.square().mean() for v in out.values()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-9, rtol=1e-7), n


def test_folded_trace_follows_other_sizes():
    model = _fold(_randomized())
    wrapped = _Levels(model)
    traced = torch.jit.trace(wrapped, torch.randn(1, 3, 64, 64), check_trace=False)
    x = torch.randn(1, 3, 80, 112, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = wrapped(x)
        out = traced(x)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


class _Levels(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return tuple(out[k] for k in LEVELS)
