"""Inference fast paths compute what the plain paths compute: ``layers.Mlp``'s chunks, ``layers.Linear``'s packed GEMM."""
import copy
import io

import pytest
import torch

from pvt_d2.modeling.backbone import layers
from pvt_d2.modeling.backbone.layers import Linear, Mlp


def _pair(dim, hidden, dwconv, x, hw, chunk_numel):
    torch.manual_seed(0)
    mlp = Mlp(dim, hidden, dwconv=dwconv).eval()
    with torch.no_grad():
        mlp.min_chunked_numel = 10 ** 12  # never chunked
        whole = mlp(x, hw)
        mlp.min_chunked_numel, mlp.chunk_numel = 0, chunk_numel
        return whole, mlp(x, hw)


@pytest.mark.parametrize("b, hw, chunk_numel", [
    (3, (29, 31), 64 * 40),     # bands of 12 rows per image (the minimum) with halo rows
    (2, (40, 7), 64 * 7 * 20),  # bands of 20 rows
    (5, (6, 9), 64 * 54 * 2),   # two whole images per chunk
])
def test_dwconv_chunks_equal_whole_tensor(b, hw, chunk_numel):
    x = torch.randn(b, hw[0] * hw[1], 16)
    whole, chunked = _pair(16, 64, True, x, hw, chunk_numel)
    assert chunked.shape == whole.shape == x.shape
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("shape", [(2, 300, 16), (2, 9, 11, 16)])
def test_token_chunks_equal_whole_tensor_any_leading_dims(shape):
    x = torch.randn(*shape)
    whole, chunked = _pair(16, 64, False, x, None, 64 * 100)
    assert chunked.shape == whole.shape == x.shape
    assert torch.equal(chunked, whole)


def test_chunked_only_in_inference():
    mlp = Mlp(16, 64, dwconv=True)
    mlp.min_chunked_numel = 0
    calls = []
    mlp._forward_chunked = lambda *a: calls.append(a)
    x = torch.randn(1, 36, 16, requires_grad=True)
    out = mlp(x, (6, 6))  # training with a graph: whole tensor
    out.sum().backward()
    assert x.grad is not None and not calls
    with torch.no_grad():
        mlp.eval()(x, (6, 6))
    assert len(calls) == 1


# --------------------------------------------------------------------------- layers.Linear (MKL-packed weights)
needs_mkl = pytest.mark.skipif(not layers._mkl_packed_linear_available(), reason="no MKL packed GEMM")


@needs_mkl
@pytest.mark.parametrize("in_f, out_f", [(64, 512), (512, 64), (320, 960), (128, 128)])
def test_packed_linear_bit_identical_to_nn_linear(in_f, out_f):
    torch.manual_seed(0)
    lin = Linear(in_f, out_f).eval()
    ref = torch.nn.Linear(in_f, out_f)
    ref.load_state_dict(lin.state_dict())
    with torch.no_grad():
        for rows in (1, 3, 64, 100, 1568):  # below min_rows nn.Linear's path, from there the packed GEMM
            x = torch.randn(2, rows, in_f)
            assert torch.equal(lin(x), ref(x)), rows
    assert len(lin._packs) == Linear.max_packed  # one pack per row count >= min_rows, LRU-bounded
    assert [k[-1] for k in lin._packs] == [64 * 2, 100 * 2, 1568 * 2]


@needs_mkl
def test_packed_linear_follows_weight_updates_copies_and_grad():
    torch.manual_seed(0)
    lin = Linear(32, 48).eval()
    x = torch.randn(200, 32)
    with torch.no_grad():
        lin(x)
        assert len(lin._packs) == 1
        lin.load_state_dict({"weight": torch.randn(48, 32), "bias": torch.randn(48)})  # in place: new version
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert len(lin._packs) == 1  # the stale pack was dropped
    clone = copy.deepcopy(lin)  # MKL-packed tensors cannot be copied: they are left behind
    assert "_packs" not in clone.__dict__
    buf = io.BytesIO()
    torch.save(lin, buf)
    # with autograd the plain path runs, and gradients flow
    y = lin(x.requires_grad_())
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad.shape == x.shape
