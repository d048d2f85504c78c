"""Tests of the LeViT backbone (pvt_d2/modeling/backbone/levit.py)."""
import math

import pytest
import timm
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone
from timm.models import levit as timm_levit
from torch import nn

from pvt_d2.config import get_pvt_d2_cfg
from pvt_d2.modeling.backbone import create_backbone, list_architectures
from pvt_d2.modeling.backbone.levit import (
    FrozenBatchNorm1d,
    LevitAttention,
    LevitBackbone,
    ShrinkAttention,
)

VARIANTS = ["levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"]
ALL_LEVELS = ["res2", "res3", "res4", "res5", "res6"]
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32, "res6": 64}
# (stage dims, classifier params in millions) from REFERENCE.md
REFERENCE = {
    "levit_128s": ((128, 256, 384), 7.8),
    "levit_128": ((128, 256, 384), 9.2),
    "levit_192": ((192, 288, 384), 11.0),
    "levit_256": ((256, 384, 512), 19.0),
    "levit_384": ((384, 512, 768), 39.0),
}
MODES = ["window", "global"]


def randomize_(model: nn.Module, calib: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random BN affine, attention biases and BN statistics.

    timm initialises the biases and some BN scales to 0 and the statistics to
    0 / 1. The running statistics are measured on the random batch ``calib``
    (one train-mode pass), so they are far from the defaults yet match the
    activation scales: every branch, bias and statistic matters.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(1 + torch.randn(bn.num_features, generator=g) * 0.3)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
            bn.reset_running_stats()
            bn.momentum = None
        for name, p in model.named_parameters():
            if "attention_biases" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2)
        model.train()
        model(calib)
        for bn in bns:
            bn.momentum = 0.1
    return model.eval()


def timm_backbone_state(model: nn.Module):
    """timm state dict without the two classifier heads (the only dropped keys)."""
    sd = model.state_dict()
    dropped = [k for k in sd if k.startswith(("head.", "head_dist."))]
    assert dropped and all(k.split(".")[0] in ("head", "head_dist") for k in dropped)
    return {k: v for k, v in sd.items() if k not in dropped}


def expected_hw(h, w, stride):
    return math.ceil(h / stride), math.ceil(w / stride)


_TIMM = {}


def timm_model(name):
    """A cached random timm classifier in eval mode, with randomized BN and biases."""
    if name not in _TIMM:
        torch.manual_seed(0)
        calib = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(5))
        _TIMM[name] = randomize_(timm.create_model(name, pretrained=False), calib)
    return _TIMM[name]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tensors here are tiny: intra-op threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registered():
    assert set(VARIANTS) <= set(list_architectures("levit"))


# ---------------------------------------------------------------------------
# (1) names, shapes, strides, channels
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw", [(31, 45), (97, 131), (64, 64), (230, 310), (8, 8), (1, 1), (17, 5)])
def test_output_shapes_any_size(mode, hw):
    model = create_backbone("levit_128s", attn_mode=mode, out_features=ALL_LEVELS).eval()
    shapes = model.output_shape()
    assert list(shapes) == ALL_LEVELS
    assert {k: s.channels for k, s in shapes.items()} == {
        "res2": 32, "res3": 64, "res4": 128, "res5": 256, "res6": 384}
    assert {k: s.stride for k, s in shapes.items()} == STRIDES
    with torch.no_grad():
        out = model(torch.randn(2, 3, *hw))
    assert list(out) == ALL_LEVELS
    for name, y in out.items():
        assert y.shape == (2, shapes[name].channels, *expected_hw(*hw, STRIDES[name])), name
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_shapes_params_and_strict_timm_load(name):
    dims, ref_params = REFERENCE[name]
    model = create_backbone(name, out_features=ALL_LEVELS)
    shapes = model.output_shape()
    assert [shapes[k].channels for k in ALL_LEVELS] == [dims[0] // 4, dims[0] // 2, *dims]
    assert [shapes[k].stride for k in ALL_LEVELS] == [4, 8, 16, 32, 64]
    default = create_backbone(name)
    assert list(default.output_shape()) == ["res2", "res3", "res4", "res5"]

    n_params = sum(p.numel() for p in model.parameters())
    # the distilled classifier adds two BN+Linear heads on the last stage
    head = 2 * (dims[2] * 1000 + 1000 + 2 * dims[2])
    assert n_params < ref_params * 1e6
    assert n_params > 0.85 * ref_params * 1e6
    assert abs(n_params + head - ref_params * 1e6) / (ref_params * 1e6) < 0.01

    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False)
    model.load_state_dict(timm_backbone_state(reference), strict=True)


# ---------------------------------------------------------------------------
# (2) parity with timm's classifier at 224
# ---------------------------------------------------------------------------
def timm_reference(t, x):
    with torch.no_grad():
        s = t.stem
        res2 = s.act2(s.conv2(s.act1(s.conv1(x))))
        res3 = s.act3(s.conv3(res2))
        res4, res5, res6 = t.forward_intermediates(x, intermediates_only=True)
    return {"res2": res2, "res3": res3, "res4": res4, "res5": res5, "res6": res6}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["levit_128s", "levit_128"])
def test_parity_224(name, mode):
    t = timm_model(name)
    # timm's kernels (BatchNorm not folded, addmm); the fast ones: tests/test_fast_inference.py
    model = create_backbone(name, attn_mode=mode, out_features=ALL_LEVELS, fast_inference=False)
    model.load_state_dict(timm_backbone_state(t), strict=True)
    model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ref = timm_reference(t, x)
    with torch.no_grad():
        out = model(x)
    for k in ALL_LEVELS:
        assert out[k].shape == ref[k].shape
        err = (out[k] - ref[k]).abs().max().item()
        assert err < 1e-5, (k, err)
        assert ref[k].abs().max() > 0.1  # not trivially zero

    # the comparison is sensitive to the attention biases (the test can fail)
    with torch.no_grad():
        table = model.stages[1].blocks[0].attn.attention_biases
        table.copy_(table.flip(-1))
        assert (model(x)["res5"] - ref["res5"]).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["levit_192", "levit_256", "levit_384"])
def test_parity_224_larger_variants_float64(name):
    """Same math as timm for the key-dim-32 variants (float64: SDPA and timm's matmuls round
    differently in float32, up to ~5e-5 at res4 and ~6e-4 at res6 there)."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    t = randomize_(timm.create_model(name, pretrained=False), x).double()
    ref = timm_reference(t, x.double())
    for mode in MODES:
        model = create_backbone(name, attn_mode=mode, out_features=ALL_LEVELS)
        model.load_state_dict(timm_backbone_state(t), strict=True)
        model.eval().double()
        with torch.no_grad():
            out = model(x.double())
        for k in ALL_LEVELS:
            assert (out[k] - ref[k]).abs().max() < 1e-9, (k, mode)


def test_parity_224_plain_bn_eval():
    t = timm_model("levit_128s")
    model = create_backbone("levit_128s", norm="BN", out_features=ALL_LEVELS, fast_inference=False)
    model.load_state_dict(timm_backbone_state(t), strict=True)
    model.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ref = timm_reference(t, x)
    with torch.no_grad():
        out = model(x)
    assert max((out[k] - ref[k]).abs().max().item() for k in ALL_LEVELS) < 1e-5


# ---------------------------------------------------------------------------
# attention geometry on other grids
# ---------------------------------------------------------------------------
def naive_attention(module, x):
    """Per-query loop implementing the documented window / global rules."""
    r, heads, d, dv = module.table_size, module.num_heads, module.key_dim, module.val_dim
    table = module.attention_biases.view(heads, r, r)
    h, w = x.shape[1:3]
    if isinstance(module, LevitAttention):
        q, k, v = module.qkv(x)[0].view(h, w, heads, -1).split([d, d, dv], -1)
        stride = 1
    else:
        k, v = module.kv(x)[0].view(h, w, heads, -1).split([d, dv], -1)
        q = module.q(x)[0]
        q = q.view(q.shape[0], q.shape[1], heads, d)
        stride = 2
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = torch.zeros(q.shape[0], q.shape[1], heads, dv)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            py, px = stride * i, stride * j
            dy, dx = (ys - py).abs(), (xs - px).abs()
            if module.attn_mode == "window":
                sel = (ys // r == py // r) & (xs // r == px // r)
            else:
                sel = torch.ones_like(ys, dtype=torch.bool)
                dy, dx = dy.clamp(max=r - 1), dx.clamp(max=r - 1)
            bias = table[:, dy[sel], dx[sel]]
            logits = torch.einsum("hd,nhd->hn", q[i, j], k[sel]) * d ** -0.5 + bias
            out[i, j] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v[sel])
    return module.proj(out.reshape(1, q.shape[0], q.shape[1], heads * dv))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind,table,grid", [
    ("attn", 14, (17, 30)), ("attn", 7, (9, 15)), ("attn", 4, (5, 11)), ("attn", 7, (3, 2)),
    ("shrink", 14, (17, 30)), ("shrink", 7, (15, 22)), ("shrink", 7, (13, 8)), ("shrink", 7, (1, 3)),
])
def test_attention_matches_naive_rule(kind, table, grid, mode):
    torch.manual_seed(0)
    if kind == "attn":
        module = LevitAttention(32, 8, 2, 2.0, table, mode)
    else:
        module = ShrinkAttention(32, 48, 8, 4, 4.0, table, mode)
    x = torch.randn(1, *grid, 32)
    randomize_(module, x)
    with torch.no_grad():
        out, ref = module(x), naive_attention(module, x)
    assert out.shape == ref.shape == (1, *expected_hw(*grid, module.stride), module.proj.ln.linear.out_features)
    assert (out - ref).abs().max() < 1e-5


def test_window_tiles_reproduce_the_classifier_layers():
    """Each full tile of a larger map is exactly timm's attention on that tile."""
    torch.manual_seed(0)
    calib = torch.randn(2, 14, 14, 64)
    attn = randomize_(LevitAttention(64, 16, 4, 2.0, 14, "window"), calib)
    ref = timm_levit.Attention(64, 16, 4, 2.0, resolution=14, act_layer=nn.Hardswish)
    ref.load_state_dict(attn.state_dict())
    ref.eval()  # timm's train() returns None
    shrink14 = randomize_(ShrinkAttention(64, 96, 16, 4, 4.0, 14, "window"), calib)
    ref14 = timm_levit.AttentionDownsample(64, 96, 16, 4, 4.0, resolution=14, act_layer=nn.Hardswish)
    ref14.load_state_dict(shrink14.state_dict())
    ref14.eval()  # timm's train() returns None
    shrink7 = randomize_(ShrinkAttention(64, 96, 16, 4, 4.0, 7, "window"), calib[:, :7, :7])
    ref7 = timm_levit.AttentionDownsample(64, 96, 16, 4, 4.0, resolution=7, act_layer=nn.Hardswish)
    ref7.load_state_dict(shrink7.state_dict())
    ref7.eval()  # timm's train() returns None

    def tokens(t):
        return t.reshape(t.shape[0], -1, t.shape[-1])

    x = torch.randn(2, 28, 31, 64)  # 2x3 tiles of 14, the last column padded
    with torch.no_grad():
        out = attn(x)
        for ty, tx in [(0, 0), (1, 1)]:
            tile = x[:, 14 * ty:14 * ty + 14, 14 * tx:14 * tx + 14]
            expect = ref(tokens(tile)).view(2, 14, 14, 64)
            assert (out[:, 14 * ty:14 * ty + 14, 14 * tx:14 * tx + 14] - expect).abs().max() < 1e-5
        out = shrink14(x)
        assert out.shape == (2, 14, 16, 96)
        expect = ref14(tokens(x[:, 14:, 14:28])).view(2, 7, 7, 96)
        assert (out[:, 7:, 7:14] - expect).abs().max() < 1e-5
        y = x[:, :21, :21]  # 3x3 tiles of 7: tiles starting at even positions match timm
        out = shrink7(y)
        assert out.shape == (2, 11, 11, 96)
        for t0, m0 in [(0, 0), (14, 7)]:
            expect = ref7(tokens(y[:, t0:t0 + 7, t0:t0 + 7])).view(2, 4, 4, 96)
            assert (out[:, m0:m0 + 4, m0:m0 + 4] - expect).abs().max() < 1e-5


def test_geometry_is_cached_per_grid(monkeypatch):
    from pvt_d2.modeling.backbone import levit

    model = create_backbone("levit_128s", out_features=ALL_LEVELS).eval()
    x = torch.randn(1, 3, 97, 131)
    built = []
    original = levit.build_tile_geometry
    monkeypatch.setattr(levit, "build_tile_geometry", lambda *a, **k: built.append(a) or original(*a, **k))
    with torch.no_grad():
        model(x)
        first = len(built)
        model(x)
    monkeypatch.undo()
    assert first > 0 and len(built) == first  # built on the first call only
    g1 = levit.build_tile_geometry((7, 9), 14, 1, True, torch.device("cpu"))
    assert g1.tiles == (1, 1) and g1.key_mask is not None


# ---------------------------------------------------------------------------
# 224 weights at other sizes
# ---------------------------------------------------------------------------
def _pretrained_run(hw, mode, name="levit_128s"):
    model = create_backbone(name, attn_mode=mode, out_features=ALL_LEVELS)
    model.load_state_dict(timm_backbone_state(timm_model(name)), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    for k, y in out.items():
        assert y.shape[-2:] == expected_hw(*hw, STRIDES[k]), k
        assert torch.isfinite(y).all(), k


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hw", [(333, 517), (64, 64), (31, 45)])
def test_pretrained_weights_any_size(hw, mode):
    _pretrained_run(hw, mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_pretrained_weights_detection_size(mode):
    _pretrained_run((800, 1216), mode)


def test_stage3_only_runs_when_needed():
    calls = []
    model = create_backbone("levit_128s").eval()
    model.stages[2].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert list(out) == ["res2", "res3", "res4", "res5"] and not calls
    model = create_backbone("levit_128s", out_features=["res3"]).eval()
    model.stages[0].register_forward_hook(lambda *a: calls.append(0))
    with torch.no_grad():
        assert list(model(torch.randn(1, 3, 64, 64))) == ["res3"]
    assert not calls


# ---------------------------------------------------------------------------
# (3) freezing, batch norm kinds, training
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("freeze_at,frozen_stages", [(1, 0), (3, 0), (4, 1), (5, 2)])
def test_freeze_at(freeze_at, frozen_stages):
    model = create_backbone("levit_128s", norm="BN", freeze_at=freeze_at, out_features=ALL_LEVELS)
    model.train()
    assert all(not p.requires_grad for p in model.stem.parameters())
    assert not any(m.training for m in model.stem.modules())
    for i, stage in enumerate(model.stages):
        frozen = i < frozen_stages
        assert all(p.requires_grad != frozen for p in stage.parameters()), i
        assert all(m.training != frozen for m in stage.modules()), i


def test_unknown_out_features_and_bad_options():
    with pytest.raises(ValueError, match="unknown out_features"):
        create_backbone("levit_128s", out_features=["res7"])
    with pytest.raises(ValueError, match="attn_mode"):
        create_backbone("levit_128s", attn_mode="local")
    with pytest.raises(ValueError, match="norm"):
        create_backbone("levit_128s", norm="GN")


def test_norm_kinds_keep_timm_keys():
    keys = set(timm_backbone_state(timm_model("levit_128s")))
    frozen = create_backbone("levit_128s", out_features=ALL_LEVELS)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm1d) for m in frozen.modules())
    assert any(type(m) is FrozenBatchNorm2d for m in frozen.modules())
    sync = create_backbone("levit_128s", norm="SyncBN", out_features=ALL_LEVELS)
    bn_types = {type(m) for m in sync.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bn_types == {nn.SyncBatchNorm}
    for model in (frozen, sync, create_backbone("levit_128s", norm="BN", out_features=ALL_LEVELS)):
        assert set(model.state_dict()) == keys


def test_frozen_bn1d_grad_branch_matches():
    bn = randomize_(nn.Sequential(nn.BatchNorm1d(6)), torch.randn(8, 6) * 3 + 1)[0]
    frozen = FrozenBatchNorm1d.from_batchnorm(bn)
    x = torch.randn(5, 6, requires_grad=True)
    assert (frozen(x) - bn(x)).abs().max() < 1e-6
    assert (frozen(x.detach()) - bn(x.detach())).abs().max() < 1e-6


@pytest.mark.parametrize("norm,mode", [("BN", "window"), ("FrozenBN", "global"), ("SyncBN", "window")])
def test_training_step(norm, mode):
    model = create_backbone("levit_128s", norm=norm, attn_mode=mode, drop_path_rate=0.1,
                            out_features=ALL_LEVELS).train()
    out = model(torch.randn(2, 3, 50, 70))
    sum(y.float().pow(2).mean() for y in out.values()).backward()
    biases = [p for n, p in model.named_parameters() if "attention_biases" in n]
    assert len(biases) == 2 + 3 + 4 + 2
    assert all(p.grad is not None for p in biases)
    assert model.stages[2].blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_build_from_config():
    cfg = get_pvt_d2_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_pvt_d2_fpn_backbone"
    cfg.MODEL.PVT_D2.ARCH = "levit_128s"
    cfg.MODEL.PVT_D2.LEVIT.ATTN_MODE = "global"
    cfg.MODEL.PVT_D2.LEVIT.NORM = "BN"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    fpn = build_backbone(cfg).eval()
    bottom_up = fpn.bottom_up
    assert isinstance(bottom_up, LevitBackbone)
    assert {m.attn_mode for m in bottom_up.modules() if hasattr(m, "attention_biases")} == {"global"}
    assert any(type(m) is nn.BatchNorm1d for m in bottom_up.modules())
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)}
    cfg.MODEL.BACKBONE.NAME = "build_pvt_d2_backbone"
    cfg.MODEL.PVT_D2.LEVIT.ATTN_MODE = "window"
    cfg.MODEL.PVT_D2.LEVIT.NORM = "FrozenBN"
    cfg.MODEL.PVT_D2.OUT_FEATURES = ["res4", "res5", "res6"]
    plain = build_backbone(cfg)
    assert {k: (s.channels, s.stride) for k, s in plain.output_shape().items()} == {
        "res4": (128, 16), "res5": (256, 32), "res6": (384, 64)}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
