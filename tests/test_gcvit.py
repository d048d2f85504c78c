"""Tests of the GC ViT backbone (pvt_d2/modeling/backbone/gcvit.py).

Parity reference: timm's ``gcvit_*`` models, randomly initialised at 224 (with
the relative position tables and layer scales re-drawn at a visible scale, so
that they matter), compared with timm's ``features_only`` outputs.
"""
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.pos_embed_rel import gen_relative_position_index

from pvt_d2.config import get_pvt_d2_cfg, load_config
from pvt_d2.modeling.backbone import build_pvt_d2_backbone, create_backbone, list_architectures
from pvt_d2.modeling.backbone.gcvit import (
    IMAGENET_WINDOW_SIZES,
    GCViT,
    GlobalContextAttention,
    RelativePositionBias,
    global_query_pool_steps,
)
from detectron2.layers import ShapeSpec

VARIANTS = ["gcvit_xxtiny", "gcvit_xtiny", "gcvit_tiny", "gcvit_small", "gcvit_base"]
# REFERENCE.md: classifier params (M) with the head, and first-stage width.
REFERENCE_PARAMS = {"gcvit_xxtiny": 12.0, "gcvit_xtiny": 20.0, "gcvit_tiny": 28.2,
                    "gcvit_small": 51.1, "gcvit_base": 90.3}
EMBED_DIM = {"gcvit_xxtiny": 64, "gcvit_xtiny": 64, "gcvit_tiny": 64, "gcvit_small": 96, "gcvit_base": 128}
NAMES = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
DETECTION_WINDOWS = (24, 24, 24, 24)


def _timm_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-init timm classifier whose bias tables and layer scales are far from their init."""
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "relative_position_bias_table" in key:
                p.normal_(0.0, 1.0)
            elif key.endswith("gamma"):
                p.uniform_(0.5, 1.0)
    return model


def _backbone_state(model: torch.nn.Module) -> dict:
    """timm's state dict minus the classifier (``head.fc.*``, the only keys dropped)."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def _timm_features(name: str, state: dict, x: torch.Tensor):
    """timm's ``features_only`` maps for ``x`` with the same weights (its stages are named ``stages_i``)."""
    feats = timm.create_model(name, features_only=True).eval()
    feats.load_state_dict({re.sub(r"^stages\.(\d)", r"stages_\1", k): v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        return feats(x)


def _check_pyramid(out: dict, hw, channels) -> None:
    assert list(out) == list(NAMES)
    for name, stride, c in zip(NAMES, STRIDES, channels):
        assert out[name].shape[1:] == (c, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)), name
        assert torch.isfinite(out[name]).all(), name


@pytest.fixture(scope="module")
def xxtiny_timm():
    model = _timm_model("gcvit_xxtiny")
    return model, _backbone_state(model)


@pytest.fixture(scope="module")
def xxtiny(xxtiny_timm):
    """gcvit_xxtiny with the ImageNet windows and the timm weights."""
    model = create_backbone("gcvit_xxtiny").eval()
    model.load_state_dict(xxtiny_timm[1], strict=True)
    return model


# --------------------------------------------------------------------------- registry / structure


def test_registered_names_and_unknown_name():
    assert list_architectures("gcvit") == sorted(VARIANTS)
    with pytest.raises(KeyError, match="gcvit_xxtiny"):
        create_backbone("gcvit_huge")


@pytest.mark.parametrize("name", VARIANTS)
def test_variants_shapes_params_and_strict_timm_keys(name):
    """Built on the meta device (no forward): output_shape, parameter count, strict loading of timm keys."""
    with torch.device("meta"):
        ref = timm.create_model(name)
        ours = create_backbone(name)
        det = create_backbone(name, window_sizes=DETECTION_WINDOWS)
    dims = [EMBED_DIM[name] * 2 ** i for i in range(4)]
    for model in (ours, det):
        shapes = model.output_shape()
        assert list(shapes) == list(NAMES)
        assert [(s.channels, s.stride) for s in shapes.values()] == list(zip(dims, STRIDES))
    state = _backbone_state(ref)
    assert set(ref.state_dict()) - set(state) == {"head.fc.weight", "head.fc.bias"}
    # Same weights for both window policies: every table keeps its ImageNet shape.
    ours.load_state_dict(state, strict=True)
    det.load_state_dict(state, strict=True)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_head = sum(p.numel() for k, p in ref.named_parameters() if k.startswith("head."))
    assert n_ours == sum(p.numel() for p in ref.parameters()) - n_head
    assert n_ours == sum(p.numel() for p in det.parameters())
    assert 0.9 * REFERENCE_PARAMS[name] * 1e6 < n_ours < REFERENCE_PARAMS[name] * 1e6


def test_layer_scale_only_for_small_and_base():
    with torch.device("meta"):
        for name in VARIANTS:
            keys = create_backbone(name).state_dict().keys()
            assert any(k.endswith("ls1.gamma") for k in keys) == (name in ("gcvit_small", "gcvit_base"))


def test_stage_structure_matches_timm_downsample_placement():
    with torch.device("meta"):
        model = create_backbone("gcvit_xxtiny")
    assert isinstance(model.stages[0].downsample, torch.nn.Identity)
    for i in (1, 2, 3):
        assert model.stages[i].downsample.reduction.stride == (2, 2)
    assert isinstance(model.stages[3].norm, torch.nn.LayerNorm)
    assert all(isinstance(model.stages[i].norm, torch.nn.Identity) for i in range(3))
    assert [b.attn.use_global for b in model.stages[2].blocks] == [False, True] * 3


# --------------------------------------------------------------------------- parity with timm at 224


@pytest.mark.parametrize("name", ["gcvit_xxtiny", "gcvit_xtiny"])
def test_parity_with_timm_features_at_224(name, xxtiny_timm):
    ref, state = xxtiny_timm if name == "gcvit_xxtiny" else (None, _backbone_state(_timm_model(name)))
    model = create_backbone(name).eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = _timm_features(name, state, x)
    with torch.no_grad():
        out = model(x)
    for key, exp in zip(NAMES, expected):
        assert out[key].shape == exp.shape
        assert exp.abs().max() > 1.0  # the comparison is not between near-zero maps
        err = (out[key] - exp).abs().max().item()
        assert err < 1e-5, f"{name} {key}: max abs diff {err:.3g}"


@pytest.mark.slow
def test_parity_with_timm_features_at_224_tiny():
    state = _backbone_state(_timm_model("gcvit_tiny"))
    model = create_backbone("gcvit_tiny").eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = _timm_features("gcvit_tiny", state, x)
    with torch.no_grad():
        out = model(x)
    for key, exp in zip(NAMES, expected):
        assert (out[key] - exp).abs().max().item() < 1e-5, key


# --------------------------------------------------------------------------- any input size


@pytest.mark.parametrize("hw", [(31, 45), (97, 131), (64, 64), (230, 310), (1, 1), (8, 8)])
def test_any_size_imagenet_windows(hw, xxtiny):
    with torch.no_grad():
        out = xxtiny(torch.randn(1, 3, *hw))
    _check_pyramid(out, hw, (64, 128, 256, 512))


@pytest.fixture(scope="module")
def xxtiny_detection(xxtiny_timm):
    model = create_backbone("gcvit_xxtiny", window_sizes=DETECTION_WINDOWS).eval()
    model.load_state_dict(xxtiny_timm[1], strict=True)  # 224 ImageNet weights, no shape mismatch
    return model


@pytest.mark.parametrize("hw", [(333, 517), (64, 64), (31, 45), (1, 1)])
def test_any_size_detection_windows(hw, xxtiny_detection):
    with torch.no_grad():
        out = xxtiny_detection(torch.randn(1, 3, *hw))
    _check_pyramid(out, hw, (64, 128, 256, 512))
    assert {k: v.stride for k, v in xxtiny_detection.output_shape().items()} == dict(zip(NAMES, STRIDES))


@pytest.mark.slow
def test_detection_windows_800x1216(xxtiny_detection):
    with torch.no_grad():
        out = xxtiny_detection(torch.randn(1, 3, 800, 1216))
    _check_pyramid(out, (800, 1216), (64, 128, 256, 512))
    assert out["res5"].shape[-2:] == (25, 38)


def test_batch_elements_are_independent(xxtiny):
    """Every window must get the global queries of its own image (4 windows per image in stage 1)."""
    x = torch.randn(2, 3, 40, 44, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = xxtiny(x)
        single = [xxtiny(x[i:i + 1]) for i in range(2)]
    for key in NAMES:
        for i in range(2):
            assert torch.allclose(both[key][i], single[i][key][0], atol=1e-5), key


def test_rank_check():
    with torch.device("meta"):
        model = create_backbone("gcvit_xxtiny")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.zeros(3, 32, 32, device="meta"))


# --------------------------------------------------------------------------- window policy pieces


def test_global_query_pool_steps_rule():
    assert global_query_pool_steps(IMAGENET_WINDOW_SIZES) == (3, 2, 0, 0)  # timm at 224
    assert global_query_pool_steps(DETECTION_WINDOWS) == (3, 2, 1, 0)  # official detection code
    with torch.device("meta"):
        det = create_backbone("gcvit_xxtiny", window_sizes=DETECTION_WINDOWS)
    assert det.pool_steps == (3, 2, 1, 0)
    assert [len(s.global_block.blocks) for s in det.stages] == [6, 4, 2, 1]


@pytest.mark.parametrize("hw", [(56, 56), (13, 200), (3, 2)])
def test_global_queries_always_fill_the_window(hw, xxtiny_detection):
    gen = xxtiny_detection.stages[0].global_block
    with torch.no_grad():
        q = gen(torch.randn(2, 64, *hw))
    assert q.shape == (2, 24 * 24, 64)


def test_global_queries_unresized_at_nominal_size(xxtiny):
    x = torch.randn(1, 64, 56, 56)
    with torch.no_grad():
        q = xxtiny.stages[0].global_block(x)
        pooled = xxtiny.stages[0].global_block.blocks(x)
    assert pooled.shape[-2:] == (7, 7)
    assert torch.equal(q, pooled.flatten(2).transpose(1, 2))


def test_relative_position_bias_same_window_matches_timm_layout():
    torch.manual_seed(0)
    rel = RelativePositionBias(7, 7, num_heads=3)
    index = gen_relative_position_index((7, 7)).view(-1)
    expected = rel.relative_position_bias_table[index].view(49, 49, 3).permute(2, 0, 1)
    with torch.no_grad():
        assert torch.equal(rel(), expected)


def test_relative_position_bias_resized_bicubically():
    torch.manual_seed(0)
    rel = RelativePositionBias(24, 7, num_heads=2)
    table = rel.relative_position_bias_table.detach()
    assert table.shape == (13 * 13, 2)
    grid = F.interpolate(table.t().reshape(1, 2, 13, 13), size=(47, 47), mode="bicubic", align_corners=False)
    resized = grid.reshape(2, 47 * 47).t()
    index = gen_relative_position_index((24, 24)).view(-1)
    expected = resized[index].view(576, 576, 2).permute(2, 0, 1)
    with torch.no_grad():
        assert torch.allclose(rel(), expected, atol=1e-6)
    # The centre of the table (zero offset) stays at the centre.
    assert rel.relative_position_index.view(576, 576)[0, 0] == 23 * 47 + 23


def test_relative_position_bias_cache():
    from pvt_d2.inference import prepare_for_inference

    rel = prepare_for_inference(RelativePositionBias(24, 7, num_heads=2))
    with torch.no_grad():
        first = rel.resized_table()
        assert first.shape == (47 * 47, 2)
        assert rel.resized_table() is first  # cached while no gradient is needed
        bias = rel()
        rel.load_state_dict({"relative_position_bias_table": torch.ones(169, 2)})
        updated = rel.resized_table()
        assert updated is not first  # loading weights bumps the version: recomputed
        assert torch.allclose(rel(), torch.ones_like(bias), atol=1e-5)
    # Training: resized from the learnable table on every call, gradients reach it.
    bias = rel()
    assert bias.requires_grad and rel.resized_table() is not rel.resized_table()
    (bias * torch.randn_like(bias)).sum().backward()
    assert rel.relative_position_bias_table.grad is not None
    assert rel.relative_position_bias_table.grad.abs().sum() > 0
    # A frozen table (FREEZE_AT) is cached even with gradients enabled.
    rel.relative_position_bias_table.requires_grad_(False)
    assert rel.resized_table() is rel.resized_table()
    # Same window as the pretraining one: the parameter itself, no copy.
    same = prepare_for_inference(RelativePositionBias(7, 7, num_heads=2))
    assert same.resized_table() is same.relative_position_bias_table


def test_masked_padding_attention_matches_naive_reference():
    torch.manual_seed(0)
    attn = GlobalContextAttention(dim=16, num_heads=2, window_size=4, pretrain_window_size=3,
                                  use_global=True).eval()
    b, nw, n, c = 2, 3, 16, 16
    x, q_global = torch.randn(b, nw, n, c), torch.randn(b, n, c)
    key_padding = torch.zeros(nw, n, dtype=torch.bool)
    key_padding[1, 12:] = True  # last row of window 1 is padding
    key_padding[2, 3::4] = True  # last column of window 2 is padding
    with torch.no_grad():
        out = attn(x, q_global, key_padding)
        k, v = attn.qkv(x).view(b, nw, n, 2, 2, 8).permute(3, 0, 1, 4, 2, 5)
        q = q_global.view(b, 1, n, 2, 8).transpose(2, 3)
        logits = (q * 8 ** -0.5) @ k.transpose(-1, -2) + attn.rel_pos()
        logits = logits.masked_fill(key_padding[None, :, None, None, :], float("-inf"))
        ref = (logits.softmax(-1) @ v).transpose(2, 3).reshape(b, nw, n, c)
        ref = attn.proj(ref)
        unmasked = attn(x, q_global)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out[:, 0], unmasked[:, 0], atol=1e-6)  # window 0 has no padding
    assert not torch.allclose(out[:, 1], unmasked[:, 1], atol=1e-3)


def test_mask_padding_is_exact_noop_without_padding(xxtiny_timm):
    # Windows 4, 4, 2, 1 tile a 64x64 image exactly (grids 16, 8, 4, 2): no padding anywhere.
    windows = (4, 4, 2, 1)
    plain = create_backbone("gcvit_xxtiny", window_sizes=windows).eval()
    masked = create_backbone("gcvit_xxtiny", window_sizes=windows, mask_padding=True).eval()
    plain.load_state_dict(xxtiny_timm[1])
    masked.load_state_dict(xxtiny_timm[1])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), masked(x)
        c, d = plain(x[..., :43, :57]), masked(x[..., :43, :57])  # stage-1 grid 11x15: padded
    assert all(torch.equal(a[k], b[k]) for k in NAMES)
    assert not torch.allclose(c["res2"], d["res2"], atol=1e-4)
    stage = masked.stages[0]
    assert stage.key_padding_mask((16, 16), x.device) is None
    mask = stage.key_padding_mask((12, 14), x.device)
    assert mask is stage.key_padding_mask((12, 14), x.device)  # cached per grid size
    assert mask.shape == (3 * 4, 16) and mask.sum() == 12 * 16 - 12 * 14


# --------------------------------------------------------------------------- training, freezing, config


def test_train_step_with_drop_path_and_resized_tables():
    model = create_backbone("gcvit_xxtiny", window_sizes=(9, 9, 9, 9), drop_path_rate=0.2).train()
    out = model(torch.randn(2, 3, 40, 56))
    sum(v.float().mean() for v in out.values()).backward()
    table = model.stages[1].blocks[1].attn.rel_pos.relative_position_bias_table
    assert table.grad is not None and torch.isfinite(table.grad).all() and table.grad.abs().sum() > 0
    assert model.stages[3].blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 3, 5])
def test_freeze_at(freeze_at):
    model = create_backbone("gcvit_xxtiny", freeze_at=freeze_at)
    model.train()
    frozen = ([model.stem] if freeze_at >= 1 else []) + list(model.stages[:max(freeze_at - 1, 0)])
    trainable = list(model.stages[max(freeze_at - 1, 0):])
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    for module in trainable + ([] if freeze_at >= 1 else [model.stem]):
        assert all(p.requires_grad for p in module.parameters())
        assert module.training


def test_out_features_subset_and_unknown():
    model = create_backbone("gcvit_xxtiny", out_features=["res3"]).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert list(out) == ["res3"] and out["res3"].shape == (1, 128, 5, 6)
    with pytest.raises(ValueError, match="unknown out_features"):
        create_backbone("gcvit_xxtiny", out_features=["res2", "res6"])


def test_build_from_config_window_policy():
    cfg = get_pvt_d2_cfg()
    cfg.MODEL.PVT_D2.ARCH = "gcvit_xxtiny"
    assert build_pvt_d2_backbone(cfg, ShapeSpec(channels=3)).window_sizes == IMAGENET_WINDOW_SIZES  # the model's own
    detection = load_config("cascade_mask_rcnn_gcvit_xxt_3x.yaml")  # the detector configs state the official 24
    assert list(detection.MODEL.PVT_D2.GCVIT.WINDOW_SIZES) == list(DETECTION_WINDOWS)
    cfg.MODEL.PVT_D2.GCVIT.WINDOW_SIZES = list(DETECTION_WINDOWS)
    model = build_pvt_d2_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(model, GCViT) and model.window_sizes == DETECTION_WINDOWS
    assert model.stages[0].blocks[0].attn.rel_pos.relative_position_bias_table.shape == (169, 2)
    cfg.MODEL.PVT_D2.GCVIT.WINDOW_SIZES = [12, 12]
    with pytest.raises(ValueError, match="window_sizes"):
        build_pvt_d2_backbone(cfg, ShapeSpec(channels=3))


def test_detectron2_checkpointer_loads_imagenet_weights_into_detection_windows(xxtiny_timm, tmp_path):
    """detectron2 drops shape-mismatched tensors before loading: no table may be dropped."""
    from detectron2.checkpoint import DetectionCheckpointer

    state = xxtiny_timm[1]
    path = tmp_path / "gcvit_xxtiny_224.pth"
    torch.save({"model": state}, path)
    model = create_backbone("gcvit_xxtiny", window_sizes=DETECTION_WINDOWS)
    DetectionCheckpointer(model).load(str(path))
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_inference_shortcuts_are_bit_identical(xxtiny):
    """The engine's in-place MBConv, residual sums and chunked attention equal the plain path exactly.

    With the same GEMMs and stem (the packed oneDNN linears and the stem's
    channels-last convs round differently: tests/test_fast_inference.py).
    """
    import copy

    from pvt_d2.inference import is_prepared, restore_from_inference

    model = copy.deepcopy(xxtiny)
    model.stem = restore_from_inference(model.stem)
    for m in list(model.modules()):
        for name in getattr(m, "packed_linears", ()):
            setattr(m, name, restore_from_inference(getattr(m, name)))
    assert is_prepared(model)
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = model(x)
    plain = model(x.clone().requires_grad_(True))  # an autograd graph: the plain code everywhere
    for key in NAMES:
        assert torch.equal(fast[key], plain[key].detach()), key
    stem_input = {}
    handle = xxtiny.stem.conv1.register_forward_pre_hook(lambda m, args: stem_input.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            xxtiny(x)
    finally:
        handle.remove()
    assert stem_input["x"].is_contiguous(memory_format=torch.channels_last)
