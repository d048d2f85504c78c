"""Inference fast paths compute what the plain paths compute.

``layers.Mlp``'s chunks and ``layers.Linear``'s packed GEMM.
"""
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


# --------------------------------------------------------------------------- window attention in chunks
def test_attention_chunks_cover_everything_in_order():
    assert layers.attention_chunks(8, 64, 100, budget=10 ** 6) == [(slice(None), slice(None))]
    # two images per chunk
    assert layers.attention_chunks(5, 4, 100, budget=800) == [(slice(i, i + 2), slice(None)) for i in (0, 2, 4)]
    # one image's windows exceed the budget: near-equal runs of windows, image by image
    chunks = layers.attention_chunks(2, 10, 100, budget=400)
    assert chunks == [(slice(i, i + 1), slice(w, w + 4)) for i in (0, 1) for w in (0, 4, 8)]
    assert layers.attention_chunks(1, 3, 100, budget=10) == [(slice(0, 1), slice(w, w + 1)) for w in range(3)]


@pytest.mark.parametrize("family", ["gcvit", "twins"])
@pytest.mark.parametrize("budget", [1, 49 * 49 * 2 * 5, 49 * 49 * 2 * 12 * 2])  # windows, images
def test_chunked_window_attention_bit_identical(monkeypatch, family, budget):
    from pvt_d2.modeling.backbone import gcvit, twins

    torch.manual_seed(0)
    if family == "gcvit":
        attn = gcvit.GlobalContextAttention(32, 2, 7, 7, use_global=False).eval()
        x = torch.randn(3, 12, 49, 32)
        run = lambda: attn(x)  # noqa: E731
    else:
        attn = twins.LocallyGroupedAttention(32, 2, window_size=7).eval()
        x = torch.randn(3, 20 * 25, 32)  # 3 x 4 windows of 7x7 after padding
        run = lambda: attn(x, (20, 25))  # noqa: E731
    module = gcvit if family == "gcvit" else twins
    with torch.no_grad():
        monkeypatch.setattr(module, "attention_chunks", lambda *a: [(slice(None), slice(None))])
        whole = run()
        monkeypatch.setattr(module, "attention_chunks", lambda b, w, p: layers.attention_chunks(b, w, p, budget))
        chunked = run()
    assert torch.equal(chunked, whole)
    # with autograd the unchunked path runs (and gives the same values)
    xg = x.clone().requires_grad_()
    graph = attn(xg) if family == "gcvit" else attn(xg, (20, 25))
    assert graph.requires_grad and torch.equal(graph.detach(), whole)


def test_contiguous_nchw_equals_contiguous():
    tokens = torch.randn(3, 5 * 7, 16)
    view = layers.tokens_to_map(tokens, (5, 7))  # channels-last view
    out = layers.contiguous_nchw(view)
    assert out.is_contiguous() and torch.equal(out, view.contiguous())
    dense = torch.randn(2, 4, 3, 3)
    assert layers.contiguous_nchw(dense) is dense
