"""Tests of the Twins (PCPVT / SVT) backbones: contract, any-size rule, timm parity.

Parity sizes. timm's Twins patch embeddings floor (a 4x4 / 2x2 stride conv
without padding) while ours pad to ``ceil(H / stride)``. The two agree at all
four stages exactly when both sides are multiples of 32, so full parity with
timm's ``features_only`` model is checked at 224x224 and at 288x352 (grids
72x88, 36x44, 18x22, 9x11: odd at res5 and none a multiple of the 7x7 window,
so the window padding runs in every stage). At 232x312 the first two levels
(58x78 and 29x39, where the sub-sampling convs also drop borders) still agree
with unmodified timm while res4/res5 differ in size by design. For fully odd
sizes (230x310, 31x45) timm's own modules are driven with our padding rule
(zero-pad to a multiple of the patch size before each patch embedding).
"""
import functools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from timm.models.twins import GlobalSubSampleAttn, LocallyGroupedAttn

from pvt_d2.config import get_pvt_d2_cfg
from pvt_d2.modeling.backbone import (
    build_pvt_d2_backbone,
    build_pvt_d2_fpn_backbone,
    create_backbone,
    get_arch,
    list_architectures,
)
from pvt_d2.modeling.backbone.key_mapping import drop_classifier_keys
from pvt_d2.modeling.backbone.layers import SpatialReductionAttention
from pvt_d2.modeling.backbone.twins import LocallyGroupedAttention, Twins

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
# name: (stage dims, ImageNet classifier params in millions, REFERENCE.md)
VARIANTS = {
    "twins_pcpvt_small": ((64, 128, 320, 512), 24.1),
    "twins_pcpvt_base": ((64, 128, 320, 512), 43.8),
    "twins_pcpvt_large": ((64, 128, 320, 512), 60.9),
    "twins_svt_small": ((64, 128, 256, 512), 24.0),
    "twins_svt_base": ((96, 192, 384, 768), 56.0),
    "twins_svt_large": ((128, 256, 512, 1024), 99.2),
}
SMALL = ("twins_pcpvt_small", "twins_svt_small")
TOL = 1e-5


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter away from its init so biases / norm affines matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _random_state(model: torch.nn.Module, seed: int) -> dict:
    """Random weights for every parameter: fan-in scaled matrices / kernels,
    small random biases, norm scales around 1 (cheaper than a real init)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1:
            is_scale = "norm" in name and name.endswith("weight")
            state[name] = noise * 0.02 + (1.0 if is_scale else 0.0)
        else:
            state[name] = noise / math.sqrt(p[0].numel())
    return state


@functools.lru_cache(maxsize=None)
def _timm_and_ours(name: str):
    """A timm ``features_only`` model with random weights and our backbone carrying them.

    The timm model's keys are ``model.<timm classifier key>`` (its final norm and
    head are pruned), so loading them strictly also checks the key mapping.
    """
    ref = timm.create_model(name, pretrained=False, features_only=True, device="meta")
    ref = ref.to_empty(device="cpu").eval()
    ref.model.load_state_dict(_random_state(ref.model, seed=1), strict=True)
    state = {k[len("model."):]: v for k, v in ref.state_dict().items()}
    with torch.device("meta"):  # timm's kernels (addmm), so that PCPVT can be compared bit for bit
        ours = create_backbone(name, extra_norm=False, fast_inference=False)
    ours = ours.to_empty(device="cpu").eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours


def _timm_padded_reference(net: torch.nn.Module, x: torch.Tensor):
    """timm's own Twins modules run with our rule: pad to the patch size first."""
    feats = []
    for embed, blocks, peg in zip(net.patch_embeds, net.blocks, net.pos_block):
        p = embed.patch_size[0]
        x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        tokens, hw = embed(x)
        for j, blk in enumerate(blocks):
            tokens = blk(tokens, hw)
            if j == 0:
                tokens = peg(tokens, hw)
        x = tokens.transpose(1, 2).reshape(x.shape[0], -1, *hw)
        feats.append(x)
    return feats


def _max_diffs(ref_feats, ours_feats, levels=LEVELS):
    diffs = {}
    for level, r in zip(LEVELS, ref_feats):
        if level in levels:
            assert ours_feats[level].shape == r.shape, (level, ours_feats[level].shape, r.shape)
            diffs[level] = (ours_feats[level] - r).abs().max().item()
    return diffs


# --------------------------------------------------------------------------- registry / config


def test_registry_names_and_unknown_name():
    assert set(list_architectures("twins")) == set(VARIANTS)
    with pytest.raises(KeyError, match="Unknown backbone architecture 'twins_svt_tiny'.*twins_svt_small"):
        get_arch("twins_svt_tiny")
    cfg = get_pvt_d2_cfg()
    cfg.MODEL.PVT_D2.ARCH = "twins_svt_tiny"
    with pytest.raises(KeyError, match="MODEL.PVT_D2.ARCH"):
        build_pvt_d2_backbone(cfg, ShapeSpec(channels=3))


def test_build_from_config_drop_path_and_extra_norm_option():
    def build(cfg):
        with torch.device("meta"):  # structure only
            return build_pvt_d2_backbone(cfg, ShapeSpec(channels=3))

    cfg = get_pvt_d2_cfg()
    cfg.MODEL.PVT_D2.ARCH = "twins_svt_small"
    cfg.MODEL.PVT_D2.DROP_PATH_RATE = 0.3
    model = build(cfg)
    assert isinstance(model, Twins)
    assert model.blocks[-1][-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert model.blocks[2][0].drop_path2.drop_prob == pytest.approx(0.3 * 4 / 17)
    assert isinstance(model.blocks[0][0].drop_path1, torch.nn.Identity)  # rate 0 for the first block
    assert model.norm_list is not None and len(model.norm_list) == 4  # SVT default: on

    cfg.MODEL.PVT_D2.TWINS = CN()
    cfg.MODEL.PVT_D2.TWINS.EXTRA_NORM = False
    assert build(cfg).norm_list is None
    cfg.MODEL.PVT_D2.ARCH = "twins_pcpvt_small"
    cfg.MODEL.PVT_D2.TWINS.EXTRA_NORM = None
    assert build(cfg).norm_list is None  # PCPVT default: off
    cfg.MODEL.PVT_D2.TWINS.EXTRA_NORM = True
    assert len(build(cfg).norm_list) == 4


def test_fpn_on_top():
    # detectron2's FPN needs sides divisible by 32 (its size_divisibility); 64x96 gives a 2x3 res5.
    cfg = get_pvt_d2_cfg()
    cfg.MODEL.PVT_D2.ARCH = "twins_svt_small"
    cfg.MODEL.FPN.IN_FEATURES = list(LEVELS)
    fpn = build_pvt_d2_fpn_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)}


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("hw", [(31, 45), (97, 131), (64, 64), (230, 310), (1, 1), (8, 8)])
def test_forward_shapes_any_size(name, hw):
    model = _timm_and_ours(name)[1]
    dims = VARIANTS[name][0]
    batch = 2 if hw[0] * hw[1] < 100 * 100 else 1
    with torch.no_grad():
        out = model(torch.randn(batch, 3, *hw))
    assert list(out) == list(LEVELS)
    for level, stride, dim in zip(LEVELS, STRIDES, dims):
        assert tuple(out[level].shape) == (batch, dim, _ceil(hw[0], stride), _ceil(hw[1], stride))
        assert torch.isfinite(out[level]).all()
    shapes = model.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        level: (dim, stride) for level, dim, stride in zip(LEVELS, dims, STRIDES)}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_all_variants_build_shapes_params_and_timm_keys(name):
    dims, params_m = VARIANTS[name]
    with torch.device("meta"):
        model = create_backbone(name, extra_norm=False)
        default = create_backbone(name)
        ref = timm.create_model(name, pretrained=False)
    shapes = model.output_shape()
    assert [(k, s.channels, s.stride) for k, s in shapes.items()] == list(zip(LEVELS, dims, STRIDES))
    assert model.size_divisibility == 0
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert 0.9 * params_m < n < params_m, n

    ref_state = ref.state_dict()
    filtered = drop_classifier_keys(ref_state)
    assert set(ref_state) - set(filtered) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        k: tuple(v.shape) for k, v in filtered.items()}
    extra = set(default.state_dict()) - set(model.state_dict())
    if "svt" in name:
        assert extra == {f"norm_list.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    else:
        assert extra == set()


def test_out_features_subset_and_unknown():
    model = create_backbone("twins_svt_small", out_features=["res3"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 56))
    assert list(out) == ["res3"] and tuple(out["res3"].shape) == (1, 128, 5, 7)
    assert list(model.output_shape()) == ["res3"]
    with pytest.raises(ValueError, match=r"unknown out_features \['res6'\]"):
        create_backbone("twins_svt_small", out_features=["res2", "res6"])
    with pytest.raises(ValueError, match="expects a"):
        model(torch.randn(3, 32, 32))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("hw", [(224, 224), (288, 352)])
def test_parity_with_timm_features_only(name, hw):
    ref, ours = _timm_and_ours(name)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diffs = _max_diffs(ref(x), ours(x))
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("name", SMALL)
def test_parity_with_timm_where_sizes_agree_232x312(name):
    ref, ours = _timm_and_ours(name)
    x = torch.randn(1, 3, 232, 312, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_feats, out = ref(x), ours(x)
    diffs = _max_diffs(ref_feats, out, levels=("res2", "res3"))
    assert max(diffs.values()) < TOL, diffs
    # Beyond res3 timm floors (29 -> 14) while we pad to ceil (29 -> 15).
    assert [tuple(f.shape[-2:]) for f in ref_feats[2:]] == [(14, 19), (7, 9)]
    assert [tuple(out[k].shape[-2:]) for k in ("res4", "res5")] == [(15, 20), (8, 10)]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("hw", [(230, 310), (31, 45)])
def test_parity_odd_sizes_with_timm_modules_padded(name, hw):
    ref, ours = _timm_and_ours(name)
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diffs = _max_diffs(_timm_padded_reference(ref.model, x), ours(x))
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["twins_pcpvt_base", "twins_pcpvt_large", "twins_svt_base", "twins_svt_large"])
def test_parity_big_variants_64x64(name):
    ref, ours = _timm_and_ours(name)
    _timm_and_ours.cache_clear()  # do not keep the big models alive
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_feats = ref(x)
        diffs = _max_diffs(ref_feats, ours(x))
    # PCPVT is bit-exact. In SVT's window attention timm applies the qkv Linear
    # to a non-contiguous view, which takes another GEMM path than our
    # contiguous windows: float32 rounding that grows to ~1e-5 over the 22
    # blocks of svt_large on features of magnitude ~20, hence a bound relative
    # to the feature scale here (the small variants meet 1e-5 absolute).
    scale = max(1.0, max(r.abs().max().item() for r in ref_feats))
    assert max(diffs.values()) < TOL * scale, diffs
    if "pcpvt" in name:
        assert max(diffs.values()) == 0.0, diffs


@pytest.mark.parametrize("hw", [(5, 9), (7, 7), (29, 39)])
def test_locally_grouped_attention_matches_timm_on_odd_grids(hw):
    torch.manual_seed(0)
    ref = LocallyGroupedAttn(64, num_heads=2, ws=7).eval()
    _perturb_(ref, seed=6)
    ours = LocallyGroupedAttention(64, num_heads=2, window_size=7).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, hw[0] * hw[1], 64)
    with torch.no_grad():
        assert (ours(x, hw) - ref(x, hw)).abs().max().item() < TOL


@pytest.mark.parametrize("hw, sr", [((29, 39), 4), ((58, 78), 8), ((15, 20), 2)])
def test_sub_sampled_attention_matches_timm_with_border_drop(hw, sr):
    torch.manual_seed(0)
    ref = GlobalSubSampleAttn(64, num_heads=2, sr_ratio=sr).eval()
    _perturb_(ref, seed=7)
    ours = SpatialReductionAttention(64, num_heads=2, sr_ratio=sr).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, hw[0] * hw[1], 64)
    with torch.no_grad():
        assert (ours(x, hw) - ref(x, hw)).abs().max().item() < TOL


# --------------------------------------------------------------------------- extra norm (SVT detection)


def test_svt_extra_norm_matches_layernorm_of_timm_stage_output():
    ref, plain = _timm_and_ours("twins_svt_small")
    model = create_backbone("twins_svt_small").eval()  # extra_norm on by default
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(
        f"norm_list.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    assert not result.unexpected_keys
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref_feats = ref(x)
        out = model(x)
    # res2 = LayerNorm(timm's res2); later stages see the normalized map, so they differ.
    normed = F.layer_norm(ref_feats[0].permute(0, 2, 3, 1), (64,), eps=1e-6).permute(0, 3, 1, 2)
    assert (out["res2"] - normed).abs().max().item() < TOL
    assert (out["res3"] - ref_feats[1]).abs().max().item() > 1e-2
    for level in LEVELS:  # fresh norms: zero mean, unit variance over channels
        v = out[level]
        assert v.mean(1).abs().max().item() < 1e-4
        assert (v.var(1, unbiased=False) - 1).abs().max().item() < 1e-3


# --------------------------------------------------------------------------- freezing / training


@pytest.mark.parametrize("freeze_at", [1, 3, 5])
def test_freeze_at(freeze_at):
    with torch.device("meta"):  # no weights needed: only flags and modes are checked
        model = create_backbone("twins_svt_small", freeze_at=freeze_at)
    if freeze_at == 1:
        frozen = ["patch_embeds.0"]
    else:
        frozen = [f"{part}.{i}" for i in range(min(freeze_at - 1, 4))
                  for part in ("patch_embeds", "blocks", "pos_block", "norm_list")]

    def is_frozen(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in frozen)

    for name, p in model.named_parameters():
        assert p.requires_grad is not is_frozen(name), name
    model.train()
    for name, m in model.named_modules():
        if is_frozen(name):
            assert not m.training, name  # dropout / drop path inside frozen stages too
        elif any(True for _ in m.parameters(recurse=False)):
            assert m.training, name
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert (n_trainable == 0) == (freeze_at == 5)
    assert any(is_frozen(n) and n.startswith("blocks.") for n, _ in model.named_parameters()) == (freeze_at >= 2)


def test_backward_at_odd_size_with_drop_path():
    model = create_backbone("twins_svt_small", drop_path_rate=0.2, freeze_at=2).train()
    out = model(torch.randn(2, 3, 31, 45))
    sum(v.square().mean() for v in out.values()).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_convs_see_the_reference_layout_at_any_batch(batch):
    """PEG and sub-sampling convs sum as timm's (channels-last for batches > 1, NCHW for one image).

    PCPVT stays bit-exact to timm at every batch size (its convs are the only
    layout-dependent sums); a contiguous NCHW copy would differ by ~2e-5 at
    batch 2.
    """
    ref, ours = _timm_and_ours("twins_pcpvt_small")
    x = torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        diffs = _max_diffs(ref(x), ours(x))
    assert max(diffs.values()) == 0.0, diffs
