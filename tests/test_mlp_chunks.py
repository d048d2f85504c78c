"""Inference fast paths compute what the plain paths compute.

The engine's chunked MLP (``FastMlp``), packed oneDNN GEMM (``PackedLinear``)
and chunked window attention.
"""
import copy
import io

import pytest
import torch

from pvt_d2.inference import kernels, modules, prepare_for_inference
from pvt_d2.inference.cache import cache_slot
from pvt_d2.inference.kernels import PackedLinear
from pvt_d2.modeling.backbone import export_ops, layers


def Mlp(*args, **kwargs):  # noqa: N802 - the prepared MLP
    return prepare_for_inference(layers.Mlp(*args, **kwargs))


def _pack(lin):
    return cache_slot(lin, "packed_linear")


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


@pytest.mark.parametrize("extra_relu", [False, True])  # GELU fused into fc1's GEMM, and applied after it
def test_token_chunks_free_each_hidden_chunk_before_the_next(monkeypatch, extra_relu):
    """A hidden chunk still referenced while the next is made doubles the working set (two buffers alternate)."""
    import weakref

    mlp = Mlp(16, 64, extra_relu=extra_relu).eval()
    mlp.min_chunked_numel, mlp.chunk_numel = 0, 64 * 100  # 100 tokens per chunk
    alive_at_creation, hidden_refs = [], []
    fc1_forward_act, fc1_forward = mlp.fc1.forward_act, mlp.fc1.forward

    def record(hidden):
        alive_at_creation.append(sum(ref() is not None for ref in hidden_refs))
        hidden_refs.append(weakref.ref(hidden))
        return hidden

    monkeypatch.setattr(mlp.fc1, "forward_act", lambda x, act=None: record(fc1_forward_act(x, act)))
    monkeypatch.setattr(mlp.fc1, "forward", lambda x: record(fc1_forward(x)))
    with torch.no_grad():
        mlp(torch.randn(2, 300, 16))
    assert mlp.fused_gelu() is not extra_relu
    assert alive_at_creation == [0] * 6  # 600 tokens in 6 chunks; no earlier chunk alive at any creation


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


# --------------------------------------------------------------------------- PackedLinear (oneDNN-packed weights)
needs_onednn = pytest.mark.skipif(not kernels.onednn_linear_available(), reason="no oneDNN linear")


def _linear_pair(in_f, out_f, bias=True):
    torch.manual_seed(0)
    lin = PackedLinear(in_f, out_f, bias=bias).eval()
    ref = torch.nn.Linear(in_f, out_f, bias=bias)
    ref.load_state_dict(lin.state_dict())
    return lin, ref


@needs_onednn
@pytest.mark.parametrize("in_f, out_f", [(64, 512), (128, 128), (512, 64), (320, 960)])
def test_packed_linear_matches_nn_linear(in_f, out_f):
    """Bit-identical up to 128 input channels, float32 rounding above; the same rows for any row count."""
    lin, ref = _linear_pair(in_f, out_f)
    x = torch.randn(2, 1568, in_f)
    with torch.no_grad():
        fast, plain = lin(x), ref(x)
        for rows in (1, 3, 64, 100):  # any row count: the same values as those rows of the big input
            assert torch.equal(lin(x[:, :rows].contiguous()), fast[:, :rows]), rows
        assert torch.equal(torch.nn.Linear.forward(lin, x), plain)  # the plain module: nn.Linear's addmm
    assert any(k[0] == torch.float32 for k in _pack(lin))  # the packed path ran
    if in_f <= 128:
        assert torch.equal(fast, plain)
    else:
        assert 0 < (fast - plain).abs().max() < 1e-5 * plain.abs().max()


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_fused_activations(bias):
    lin, ref = _linear_pair(96, 200, bias)
    x = torch.randn(300, 96)
    with torch.no_grad():
        y = lin(x)
        assert torch.equal(lin.forward_act(x, "gelu"), torch.nn.functional.gelu(y))  # GELU: bit-identical
        hs = lin.forward_act(x, "hardswish")
        assert (hs - torch.nn.functional.hardswish(y)).abs().max() <= 1e-6 * y.abs().max()
    # plain path (autograd): the functions themselves
    xg = x.clone().requires_grad_()
    assert torch.allclose(lin.forward_act(xg, "gelu"), torch.nn.functional.gelu(ref(x)), atol=1e-6)


def test_mlp_fuses_gelu_only_where_it_follows_fc1():
    assert Mlp(16, 64).fused_gelu()
    assert not Mlp(16, 64, dwconv=True).fused_gelu()  # PVT v2: GELU after the depthwise conv
    assert not Mlp(16, 64, extra_relu=True).fused_gelu()  # PVT v2-li: ReLU between


@needs_onednn
def test_packed_linear_follows_weight_updates_copies_and_grad():
    torch.manual_seed(0)
    lin = PackedLinear(32, 48).eval()
    assert isinstance(lin, PackedLinear)
    x = torch.randn(200, 32)
    packed_now = lambda: list(_pack(lin).values())[-1][1][0]  # noqa: E731
    with torch.no_grad():
        lin(x)
        packed = packed_now()
        lin(x)
        assert packed_now() is packed and len(_pack(lin)) == 1  # reused
        lin.load_state_dict({"weight": torch.randn(48, 32), "bias": torch.randn(48)})  # in place: new version
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert packed_now() is not packed  # the stale pack was replaced
        lin.bias.add_(1.0)  # the bias alone changes: the cached bias follows
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        lin.weight = torch.nn.Parameter(torch.randn(48, 32))  # a new tensor object
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        lin.weight.data = torch.randn(48, 32)  # new storage, same object and version (what Module.to does)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    clone = copy.deepcopy(lin)  # oneDNN-packed tensors cannot be copied: they are kept outside the module
    assert not cache_slot(clone, "packed_linear", create=False) and torch.equal(clone(x), lin(x))
    buf = io.BytesIO()
    torch.save(lin, buf)
    # with autograd the plain path runs, and gradients flow
    y = lin(x.requires_grad_())
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad.shape == x.shape


# --------------------------------------------------------------------------- window attention in chunks
def test_attention_chunks_cover_everything_in_order():
    assert kernels.attention_chunks(8, 64, 100, budget=10 ** 6) == [(slice(None), slice(None))]
    # two images per chunk
    assert kernels.attention_chunks(5, 4, 100, budget=800) == [(slice(i, i + 2), slice(None)) for i in (0, 2, 4)]
    # one image's windows exceed the budget: near-equal runs of windows, image by image
    chunks = kernels.attention_chunks(2, 10, 100, budget=400)
    assert chunks == [(slice(i, i + 1), slice(w, w + 4)) for i in (0, 1) for w in (0, 4, 8)]
    assert kernels.attention_chunks(1, 3, 100, budget=10) == [(slice(0, 1), slice(w, w + 1)) for w in range(3)]


@pytest.mark.parametrize("family", ["gcvit", "twins"])
@pytest.mark.parametrize("budget", [1, 49 * 49 * 2 * 5, 49 * 49 * 2 * 12 * 2])  # windows, images
def test_chunked_window_attention_bit_identical(monkeypatch, family, budget):
    from pvt_d2.modeling.backbone import gcvit, twins

    torch.manual_seed(0)
    if family == "gcvit":
        attn = prepare_for_inference(gcvit.GlobalContextAttention(32, 2, 7, 7, use_global=False)).eval()
        x = torch.randn(3, 12, 49, 32)
        run = lambda: attn(x)  # noqa: E731
    else:
        attn = prepare_for_inference(twins.LocallyGroupedAttention(32, 2, window_size=7)).eval()
        x = torch.randn(3, 20 * 25, 32)  # 3 x 4 windows of 7x7 after padding
        run = lambda: attn(x, (20, 25))  # noqa: E731
    with torch.no_grad():
        monkeypatch.setattr(modules, "attention_chunks", lambda *a: [(slice(None), slice(None))])
        whole = run()
        monkeypatch.setattr(modules, "attention_chunks", lambda b, w, p: kernels.attention_chunks(b, w, p, budget))
        chunked = run()
    assert torch.equal(chunked, whole)
    # with autograd the unchunked path runs (and gives the same values)
    xg = x.clone().requires_grad_()
    graph = attn(xg) if family == "gcvit" else attn(xg, (20, 25))
    assert graph.requires_grad and torch.equal(graph.detach(), whole)


@pytest.mark.parametrize("family", ["gcvit", "twins"])
def test_window_attention_releases_qkv_before_proj(family):
    """In inference the 3x-token ``qkv`` output is freed before ``proj`` allocates (lower peak memory)."""
    import weakref

    from pvt_d2.modeling.backbone import gcvit, twins

    torch.manual_seed(0)
    if family == "gcvit":
        attn = prepare_for_inference(gcvit.GlobalContextAttention(32, 2, 7, 7, use_global=False)).eval()
        x = torch.randn(2, 4, 49, 32)
        run = lambda: attn(x)  # noqa: E731
    else:
        attn = prepare_for_inference(twins.LocallyGroupedAttention(32, 2, window_size=7)).eval()
        x = torch.randn(2, 14 * 14, 32)
        run = lambda: attn(x, (14, 14))  # noqa: E731
    seen = {}
    attn.qkv.register_forward_hook(lambda m, i, out: seen.__setitem__("qkv", weakref.ref(out.untyped_storage())))
    attn.proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("alive", seen["qkv"]() is not None))
    with torch.no_grad():
        run()
    assert seen["alive"] is False


def test_contiguous_nchw_equals_contiguous():
    tokens = torch.randn(3, 5 * 7, 16)
    view = export_ops.tokens_to_map(tokens, (5, 7))  # channels-last view
    out = export_ops.contiguous_nchw(view)
    assert out.is_contiguous() and torch.equal(out, view.contiguous())
    dense = torch.randn(2, 4, 3, 3)
    assert export_ops.contiguous_nchw(dense) is dense
