"""The chunked inference path of ``layers.Mlp`` computes what the whole-tensor path computes."""
import pytest
import torch

from pvt_d2.modeling.backbone.layers import Mlp


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
