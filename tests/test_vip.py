"""Tests of the Vision Permutator (ViP) backbone.

The parity reference below is an independent, plain re-statement of the seed's
(official) ``WeightedPermuteMLP`` / ``PermutatorBlock`` / trunk forward with
the explicit reshape/permute of the original code, evaluated with
``torch.nn.functional`` on the weights of our modules.
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pvt_d2.checkpoint.convert import new_parameter_prefixes
from pvt_d2.modeling.backbone import create_backbone
from pvt_d2.modeling.backbone.key_mapping import CLASSIFIER_KEY_PREFIXES, drop_classifier_keys
from pvt_d2.modeling.backbone.vip import (
    PermutatorBlock,
    VisionPermutator,
    WeightedPermuteMLP,
    mix_in_windows,
)

LEVELS = ("res2", "res3", "res4", "res5")
STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}

# Hyperparameters and classifier parameter counts (millions) from REFERENCE.md / the seed.
SPECS = {
    "vip_s14": dict(patch=14, layers=(4, 3, 8, 3), dims=(384, 384, 384, 384), segs=(16, 16, 16, 16),
                    transitions=(False, False, False, False), params=29.9),
    "vip_s7": dict(patch=7, layers=(4, 3, 8, 3), dims=(192, 384, 384, 384), segs=(32, 16, 16, 16),
                   transitions=(True, False, False, False), params=25.1),
    "vip_m7": dict(patch=7, layers=(4, 3, 14, 3), dims=(256, 256, 512, 512), segs=(32, 32, 16, 16),
                   transitions=(False, True, False, False), params=55.3),
    "vip_l7": dict(patch=7, layers=(8, 8, 16, 4), dims=(256, 512, 512, 512), segs=(32, 16, 16, 16),
                   transitions=(True, False, False, False), params=87.8),
}
VARIANTS = tuple(SPECS)
PARITY_TOL = 1e-5


# --------------------------------------------------------------------------------------
# Independent reference: the seed's forward, written out with explicit reshape/permute.
# --------------------------------------------------------------------------------------
def _linear(x, layer):
    return F.linear(x, layer.weight, layer.bias)


def seed_branch_h(m, x):
    """Seed's height branch; needs H == segment_dim."""
    B, H, W, C = x.shape
    seg = m.segment_dim
    S = C // seg
    h = x.reshape(B, H, W, seg, S).permute(0, 3, 2, 1, 4).reshape(B, seg, W, H * S)
    return _linear(h, m.mlp_h).reshape(B, seg, W, H, S).permute(0, 3, 2, 1, 4).reshape(B, H, W, C)


def seed_branch_w(m, x):
    """Seed's width branch; needs W == segment_dim."""
    B, H, W, C = x.shape
    seg = m.segment_dim
    S = C // seg
    w = x.reshape(B, H, W, seg, S).permute(0, 1, 3, 2, 4).reshape(B, H, seg, W * S)
    return _linear(w, m.mlp_w).reshape(B, H, seg, W, S).permute(0, 1, 3, 2, 4).reshape(B, H, W, C)


def seed_combine(m, h, w, c):
    B, H, W, C = h.shape
    a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
    a = _linear(F.gelu(_linear(a, m.reweight.fc1)), m.reweight.fc2)
    a = a.reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
    x = h * a[0] + w * a[1] + c * a[2]
    return _linear(x, m.proj)


def seed_permute_mlp(m, x):
    """The seed's WeightedPermuteMLP.forward (native grid only)."""
    return seed_combine(m, seed_branch_h(m, x), seed_branch_w(m, x), _linear(x, m.mlp_c))


def windowed_permute_mlp(m, x):
    """The documented any-size rule, spelled out: zero-pad both sides to a multiple of
    segment_dim, run the seed's branches window by window, crop; pool over real tokens."""
    B, H, W, C = x.shape
    L = m.segment_dim
    Hp, Wp = math.ceil(H / L) * L, math.ceil(W / L) * L
    xp = x.new_zeros(B, Hp, Wp, C)
    xp[:, :H, :W] = x
    h = torch.cat([seed_branch_h(m, xp[:, i:i + L]) for i in range(0, Hp, L)], dim=1)
    w = torch.cat([seed_branch_w(m, xp[:, :, j:j + L]) for j in range(0, Wp, L)], dim=2)
    return seed_combine(m, h[:, :H, :W], w[:, :H, :W], _linear(x, m.mlp_c))


def seed_block(blk, x, permute_fn=seed_permute_mlp):
    """The seed's PermutatorBlock.forward (eval: drop path is the identity; LayerNorm eps 1e-5)."""
    C = x.shape[-1]
    y = F.layer_norm(x, (C,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    x = x + permute_fn(blk.attn, y) / blk.skip_lam
    y = F.layer_norm(x, (C,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    return x + _linear(F.gelu(_linear(y, blk.mlp.fc1)), blk.mlp.fc2) / blk.skip_lam


def seed_trunk(model, img):
    """The seed's forward_embeddings + forward_tokens; returns the output of every stage."""
    x = F.conv2d(img, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                 stride=model.patch_embed.proj.kernel_size).permute(0, 2, 3, 1)
    outs = []
    for module in model.network:
        if isinstance(module, nn.Sequential):
            for blk in module:
                x = seed_block(blk, x)
            outs.append(x)
        else:  # the seed's Downsample: conv with kernel = stride
            x = F.conv2d(x.permute(0, 3, 1, 2), module.proj.weight, module.proj.bias,
                         stride=module.proj.kernel_size).permute(0, 2, 3, 1)
    return outs


def seed_state_dict_shapes(name, in_chans=3, num_classes=1000):
    """Key -> shape of the seed's VisionPermutator classifier for a variant."""
    s = SPECS[name]
    dims, layers = s["dims"], s["layers"]
    shapes = {"patch_embed.proj.weight": (dims[0], in_chans, s["patch"], s["patch"]),
              "patch_embed.proj.bias": (dims[0],)}
    idx = 0
    for i in range(4):
        d = dims[i]
        for j in range(layers[i]):
            p = f"network.{idx}.{j}."
            shapes.update({
                p + "norm1.weight": (d,), p + "norm1.bias": (d,),
                p + "attn.mlp_c.weight": (d, d), p + "attn.mlp_h.weight": (d, d), p + "attn.mlp_w.weight": (d, d),
                p + "attn.reweight.fc1.weight": (d // 4, d), p + "attn.reweight.fc1.bias": (d // 4,),
                p + "attn.reweight.fc2.weight": (3 * d, d // 4), p + "attn.reweight.fc2.bias": (3 * d,),
                p + "attn.proj.weight": (d, d), p + "attn.proj.bias": (d,),
                p + "norm2.weight": (d,), p + "norm2.bias": (d,),
                p + "mlp.fc1.weight": (3 * d, d), p + "mlp.fc1.bias": (3 * d,),
                p + "mlp.fc2.weight": (d, 3 * d), p + "mlp.fc2.bias": (d,),
            })
        idx += 1
        if i < 3 and (s["transitions"][i] or dims[i] != dims[i + 1]):
            k = 2 if s["transitions"][i] else 1
            shapes[f"network.{idx}.proj.weight"] = (dims[i + 1], d, k, k)
            shapes[f"network.{idx}.proj.bias"] = (dims[i + 1],)
            idx += 1
    shapes.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
                   "head.weight": (num_classes, dims[-1]), "head.bias": (num_classes,)})
    return shapes


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def randomize_(module, seed=0, std=0.02):
    """Random values for every parameter (biases and LayerNorm affine included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_scale = "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight")
            p.normal_(1.0 if is_norm_scale else 0.0, 0.1 if is_norm_scale else std, generator=g)
    return module


def _materialize(build, seed):
    # Build on the meta device (skips the costly default init), then fill every
    # parameter with seeded random values; the model has no buffers.
    with torch.device("meta"):
        model = build()
    return randomize_(model.to_empty(device="cpu"), seed=seed).eval()


@functools.lru_cache(maxsize=None)
def meta_model(name):
    """Shapes only: for output_shape / parameter-count checks of the big variants."""
    with torch.device("meta"):
        return create_backbone(name)


@functools.lru_cache(maxsize=None)
def random_model(name):
    """A full-depth variant with seeded random weights."""
    return _materialize(lambda: create_backbone(name), seed=sum(map(ord, name)))


@functools.lru_cache(maxsize=None)
def shallow_model(name):
    """A variant's stage layout (dims, segment dims, transitions, patch) with one block per stage."""
    s = SPECS[name]
    return _materialize(lambda: VisionPermutator(
        layers=(1, 1, 1, 1), embed_dims=s["dims"], segment_dims=s["segs"], transitions=s["transitions"],
        patch_size=s["patch"]), seed=len(name))


def ceil_div(a, b):
    return -(-a // b)


def check_pyramid(model, out, hw, batch=1):
    assert set(out) == set(model._out_features)
    for k, v in out.items():
        spec = model.output_shape()[k]
        assert v.shape == (batch, spec.channels, ceil_div(hw[0], spec.stride), ceil_div(hw[1], spec.stride)), (k, hw)
        assert torch.isfinite(v).all(), k


# --------------------------------------------------------------------------------------
# (1) outputs: names, channels, strides, shapes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_output_shape_and_params(name):
    model = meta_model(name)
    spec = SPECS[name]
    shapes = model.output_shape()
    assert list(shapes) == list(LEVELS)
    for i, lvl in enumerate(LEVELS):
        assert shapes[lvl].channels == spec["dims"][i]
        assert shapes[lvl].stride == STRIDES[lvl]
    # The pretrained part is exactly the seed's classifier minus its head and final norm ...
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith(new_parameter_prefixes("vip"))}
    seed = seed_state_dict_shapes(name)
    assert ours == {k: v for k, v in seed.items() if not k.startswith(CLASSIFIER_KEY_PREFIXES)}
    classifier = sum(math.prod(s) for s in seed.values()) / 1e6
    assert classifier == pytest.approx(spec["params"], rel=0.005)
    # ... and the whole backbone (with the new necks) stays within 10% of the classifier.
    total = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(total - spec["params"]) / spec["params"] < 0.10


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("hw", [(64, 64), (31, 45)])
def test_forward_small_sizes_all_variants(name, hw):
    model = random_model(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *hw))
    check_pyramid(model, out, hw)


@pytest.mark.parametrize("name", ["vip_s7", "vip_s14"])
@pytest.mark.parametrize("hw", [(333, 517), (97, 131), (230, 310), (8, 8), (1, 1), (17, 200)])
def test_forward_any_size(name, hw):
    model = random_model(name)
    batch = 1 if hw[0] * hw[1] > 50000 else 2
    with torch.no_grad():
        out = model(torch.randn(batch, 3, *hw))
    check_pyramid(model, out, hw, batch=batch)


@pytest.mark.slow
def test_forward_detection_size():
    model = random_model("vip_s7")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 800, 1216))
    check_pyramid(model, out, (800, 1216))
    assert out["res2"].shape[-2:] == (200, 304) and out["res5"].shape[-2:] == (25, 38)


@pytest.mark.parametrize("name,grid", [("vip_s7", 8), ("vip_s14", 16)])
def test_resampled_patch_grid_is_exact(name, grid):
    model = random_model(name)
    assert model.grid_stride == grid
    x = torch.randn(1, 3, 31, 45)
    y = model.resample_input(x)
    p = SPECS[name]["patch"]
    assert y.shape[-2:] == (ceil_div(31, grid) * p, ceil_div(45, grid) * p)
    # 256 px is resized to exactly the classifier's 224 px input.
    img = torch.randn(1, 3, 256, 256)
    expected = F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False)
    assert torch.equal(model.resample_input(img), expected)


def test_stage_strides_follow_transitions():
    assert random_model("vip_s14").stage_strides == {"res2": 16, "res3": 16, "res4": 16, "res5": 16}
    assert random_model("vip_s7").stage_strides == {"res2": 8, "res3": 16, "res4": 16, "res5": 16}
    assert random_model("vip_m7").stage_strides == {"res2": 8, "res3": 8, "res4": 16, "res5": 16}
    assert random_model("vip_l7").stage_strides == {"res2": 8, "res3": 16, "res4": 16, "res5": 16}


# --------------------------------------------------------------------------------------
# (2) parity with the seed's math
# --------------------------------------------------------------------------------------
BLOCK_CONFIGS = sorted({(d, s) for spec in SPECS.values() for d, s in zip(spec["dims"], spec["segs"])})


@pytest.mark.parametrize("dim,seg", BLOCK_CONFIGS)
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_block_parity_native_grid(dim, seg, qkv_bias):
    torch.manual_seed(dim + seg)
    blk = randomize_(PermutatorBlock(dim, seg, mlp_ratio=3.0, qkv_bias=qkv_bias, skip_lam=2.0), seed=dim).eval()
    x = torch.randn(2, seg, seg, dim)
    with torch.no_grad():
        err_mlp = (blk.attn(x) - seed_permute_mlp(blk.attn, x)).abs().max().item()
        err_blk = (blk(x) - seed_block(blk, x)).abs().max().item()
    assert err_mlp < PARITY_TOL and err_blk < PARITY_TOL, (err_mlp, err_blk)


def _check_stage_parity(model, name):
    img = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_stages(img)
        ref = seed_trunk(model, img)
    assert len(ours) == len(ref) == 4
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape
        assert a.shape[1] == a.shape[2] == SPECS[name]["segs"][i]  # the native grid
        err = (a - b).abs().max().item()
        assert err < PARITY_TOL, (name, i, err)


@pytest.mark.parametrize("name", VARIANTS)
def test_stage_parity_native_224_shallow(name):
    """Each variant's stage layout, one block per stage: our trunk on 224 px equals the seed's."""
    _check_stage_parity(shallow_model(name), name)


@pytest.mark.parametrize("name", ["vip_s7"] + [pytest.param(n, marks=pytest.mark.slow)
                                               for n in ("vip_s14", "vip_m7", "vip_l7")])
def test_stage_parity_native_224(name):
    """Full depth: our trunk on a 224 px image equals the seed's trunk stage by stage."""
    _check_stage_parity(random_model(name), name)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("hw", [(97, 131), (31, 45)])
def test_stage_parity_any_size_shallow(name, hw):
    """Off the native grid, every stage equals the seed's blocks run with the windowed rule."""
    model = shallow_model(name)
    img = model.resample_input(torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(3)))
    with torch.no_grad():
        ours = model.forward_stages(img)
        x = F.conv2d(img, model.patch_embed.proj.weight, model.patch_embed.proj.bias,
                     stride=model.patch_size).permute(0, 2, 3, 1)
        ref = []
        for module in model.network:
            if isinstance(module, nn.Sequential):
                for blk in module:
                    x = seed_block(blk, x, windowed_permute_mlp)
                ref.append(x)
            else:  # zero-pad odd sides, then the seed's downsampling conv
                x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
                x = F.conv2d(x.permute(0, 3, 1, 2), module.proj.weight, module.proj.bias,
                             stride=2).permute(0, 2, 3, 1)
    for i, (a, b) in enumerate(zip(ours, ref)):
        stride = model.stage_strides[LEVELS[i]]
        assert a.shape[1:3] == (ceil_div(hw[0], stride), ceil_div(hw[1], stride))
        err = (a - b).abs().max().item()
        assert err < PARITY_TOL, (name, hw, i, err)


@pytest.mark.parametrize("name", VARIANTS)
def test_pyramid_at_256_is_the_224_classifier(name):
    """A 256 px image is the classifier's 224 px computation; identity levels equal its stages."""
    model = shallow_model(name)
    img = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(img)
        ref = seed_trunk(model, F.interpolate(img, size=(224, 224), mode="bilinear", align_corners=False))
    check_pyramid(model, out, (256, 256))
    identity = [i for i, lvl in enumerate(LEVELS) if model.stage_strides[lvl] == STRIDES[lvl]]
    assert 2 in identity
    for i in identity:
        err = (out[LEVELS[i]] - ref[i].permute(0, 3, 1, 2)).abs().max().item()
        assert err < PARITY_TOL, (name, LEVELS[i], err)
    # res5 is the 2x2 max pool of the last stage.
    err = (out["res5"] - F.max_pool2d(ref[3].permute(0, 3, 1, 2), 2)).abs().max().item()
    assert err < PARITY_TOL


@pytest.mark.parametrize("hw", [(37, 45), (5, 70), (16, 16), (1, 3)])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_windowed_rule_any_grid(hw, qkv_bias):
    """Off the native grid, mixing equals the seed's branches run on padded windows, then cropped."""
    m = randomize_(WeightedPermuteMLP(64, 16, qkv_bias=qkv_bias), seed=3).eval()
    x = torch.randn(2, *hw, 64)
    with torch.no_grad():
        err = (m(x) - windowed_permute_mlp(m, x)).abs().max().item()
    assert err < PARITY_TOL, err


def test_windows_are_independent():
    """The height branch at row r only sees rows of r's window (no leakage across windows)."""
    m = randomize_(WeightedPermuteMLP(32, 8), seed=4).eval()
    x = torch.randn(1, 20, 5, 32)
    y = x.clone()
    y[:, 8:16] += 1.0  # change the second window only
    with torch.no_grad():
        a = mix_in_windows(x.transpose(1, 2), m.mlp_h, 8).transpose(1, 2)
        b = mix_in_windows(y.transpose(1, 2), m.mlp_h, 8).transpose(1, 2)
    assert torch.equal(a[:, :8], b[:, :8]) and torch.equal(a[:, 16:], b[:, 16:])
    assert not torch.allclose(a[:, 8:16], b[:, 8:16])


# --------------------------------------------------------------------------------------
# checkpoint loading
# --------------------------------------------------------------------------------------
def test_official_checkpoint_loads():
    with torch.device("meta"):
        model = create_backbone("vip_s7")
    model = model.to_empty(device="cpu")
    shapes = seed_state_dict_shapes("vip_s7")
    g = torch.Generator().manual_seed(5)
    ckpt = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    result = model.load_state_dict(drop_classifier_keys(ckpt), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(new_parameter_prefixes("vip")) for k in result.missing_keys)
    assert {k.split(".")[1] for k in result.missing_keys} == {"res2", "res3"}
    assert torch.equal(model.network[1].proj.weight, ckpt["network.1.proj.weight"])
    assert torch.equal(model.patch_embed.proj.weight, ckpt["patch_embed.proj.weight"])


# --------------------------------------------------------------------------------------
# (3) FREEZE_AT, (4) out_features, config builders, training
# --------------------------------------------------------------------------------------
def test_freeze_at():
    with torch.device("meta"):
        model = create_backbone("vip_s7", freeze_at=1)
    assert all(not p.requires_grad for p in model.patch_embed.parameters())
    assert all(p.requires_grad for p in model.network.parameters())

    model = _materialize(lambda: create_backbone("vip_s7", freeze_at=3, drop_path_rate=0.1), seed=6)
    model.train()
    frozen = [model.patch_embed, model.network[0], model.network[1], model.network[2]]  # stage 0, downsample, stage 1
    for m in frozen:
        assert all(not p.requires_grad for p in m.parameters())
        assert all(not sub.training for sub in m.modules())
    for m in (model.network[3], model.network[4], model.necks):
        assert all(p.requires_grad for p in m.parameters())
        assert m.training
    # frozen modules stay frozen (eval) in training mode: repeated forwards agree on them
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        s1 = model.forward_stages(model.resample_input(x), 2)[1]
        s2 = model.forward_stages(model.resample_input(x), 2)[1]
    assert torch.equal(s1, s2)

    with torch.device("meta"):
        model = create_backbone("vip_s14", freeze_at=5)
    assert all(not p.requires_grad for p in model.network.parameters())
    assert all(p.requires_grad for p in model.necks.parameters())
    assert sum(p.numel() for p in model.necks.parameters()) > 0


def test_unknown_out_features():
    with torch.device("meta"), pytest.raises(ValueError, match="unknown out_features"):
        create_backbone("vip_s7", out_features=["res2", "res6"])
    with torch.device("meta"), pytest.raises(ValueError, match="unknown out_features"):
        create_backbone("vip_s14", out_features=["stem"])


def test_out_features_subset_and_output_norm():
    model = _materialize(lambda: create_backbone("vip_s7", out_features=["res3"], output_norm=True), seed=7)
    assert list(model.output_shape()) == ["res3"]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 50, 70))
    assert list(out) == ["res3"] and out["res3"].shape == (1, 384, 7, 9)
    assert any(k.startswith("output_norms.") for k in model.state_dict())


def test_bad_input_rejected():
    model = random_model("vip_s7")
    with pytest.raises(ValueError, match="expects a"):
        model(torch.randn(3, 32, 32))


def test_backward_with_drop_path():
    model = _materialize(lambda: create_backbone("vip_s7", drop_path_rate=0.2), seed=8).train()
    out = model(torch.randn(2, 3, 24, 40))
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_config_builders():
    from detectron2.modeling import build_backbone

    from pvt_d2.config import get_pvt_d2_cfg

    cfg = get_pvt_d2_cfg()
    cfg.MODEL.PVT_D2.ARCH = "vip_s7"
    cfg.MODEL.BACKBONE.NAME = "build_pvt_d2_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = list(LEVELS)
    fpn = build_backbone(cfg).eval()
    assert isinstance(fpn.bottom_up, VisionPermutator)
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        "p2": (16, 24), "p3": (8, 12), "p4": (4, 6), "p5": (2, 3), "p6": (1, 2)}
