"""The CPU inference engine (``pvt_d2.inference.prepare_for_inference``): same function, float32 rounding only.

Prepared (the default of ``create_backbone`` and the config), CPU float32
inference runs the linears as oneDNN GEMMs on packed weights (GELU fused) and
folds LeViT's fixed BatchNorms; the plain model runs timm's kernels, against
which the parity tests of each family compare. Here: the two agree to float32
rounding on every family that has such layers, the fast path really runs,
the swap reaches every module from the config, and restoring gives back the
plain modules and outputs.
"""
import pytest
import torch
from detectron2.layers import ShapeSpec

from pvt_d2.config import get_pvt_d2_cfg
from pvt_d2.inference import is_prepared, kernels, modules, prepare_for_inference, restore_from_inference
from pvt_d2.inference.cache import cache_slot
from pvt_d2.modeling.backbone import build_pvt_d2_backbone, create_backbone, layers
from pvt_d2.modeling.backbone.levit import LinearBN

FAMILIES = ["pvt_tiny", "pvt_v2_b0", "twins_pcpvt_small", "twins_svt_small", "levit_128s", "gcvit_xxtiny"]
needs_onednn = pytest.mark.skipif(not kernels.onednn_linear_available(), reason="no oneDNN linear")


def _packed(model):
    """The modules of ``model`` holding a packed weight."""
    return [m for m in model.modules() if cache_slot(m, "packed_linear", create=False)]


def _set(model, enabled):
    return prepare_for_inference(model) if enabled else restore_from_inference(model)


@needs_onednn
@pytest.mark.parametrize("name", FAMILIES)
def test_fast_inference_differs_from_the_reference_kernels_by_rounding_only(name):
    torch.manual_seed(0)
    kwargs = {"out_features": ["res2", "res3", "res4", "res5"]} if name.startswith("levit") else {}
    model = create_backbone(name, **kwargs).eval()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = model(x)
        packed = _packed(model)
        ref = _set(model, False)(x)
    assert fast.keys() == ref.keys()
    worst = max(((fast[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)
    assert 0 < worst < 1e-5  # > 0: another summation order really ran (layers of more than 128 channels)
    assert packed  # the packed GEMM ran
    assert not _packed(model)  # restoring drops the packs


@needs_onednn
def test_fast_inference_keeps_training_and_autograd_on_the_reference_kernels():
    torch.manual_seed(0)
    model = create_backbone("twins_svt_small").eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _set(model, False)(x)
    graph = _set(model, True)(x.clone().requires_grad_())  # autograd records: addmm
    assert is_prepared(model)
    assert all(torch.equal(graph[k].detach(), ref[k]) for k in ref)
    assert not _packed(model)


@pytest.mark.parametrize("enabled", [True, False])
def test_config_key_reaches_every_module(enabled):
    cfg = get_pvt_d2_cfg()
    assert cfg.MODEL.PVT_D2.FAST_INFERENCE is True  # the default
    cfg.MODEL.PVT_D2.ARCH = "levit_128s"
    cfg.MODEL.PVT_D2.FAST_INFERENCE = enabled
    model = build_pvt_d2_backbone(cfg, ShapeSpec(channels=3))
    linear_bn = [m for m in model.modules() if isinstance(m, LinearBN)]
    assert linear_bn and all(isinstance(m, modules.FoldedLinearBN) is enabled for m in linear_bn)
    assert all(isinstance(m.linear, kernels.PackedLinear) is enabled for m in linear_bn)
    assert is_prepared(model) is enabled
    mlps = [m for m in create_backbone("pvt_v2_b0", fast_inference=enabled).modules() if isinstance(m, layers.Mlp)]
    assert mlps and all(isinstance(m, modules.FastMlp) is enabled for m in mlps)
    assert all(isinstance(m.fc1, kernels.PackedLinear) is enabled for m in mlps)


@pytest.mark.parametrize("name", FAMILIES + ["vip_s7"])
def test_restore_gives_back_the_plain_model_bit_for_bit(name):
    """prepare -> run -> restore: plain module types, the same state dict, outputs equal to a never-prepared model."""
    kwargs = {"out_features": ["res2", "res3", "res4", "res5"]} if name.startswith("levit") else {}
    torch.manual_seed(0)
    plain = create_backbone(name, fast_inference=False, **kwargs).eval()
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs).eval()
    plain_types = [type(m) for m in plain.modules()]
    assert [type(m) for m in model.modules()] != plain_types and is_prepared(model)
    x = torch.randn(2, 3, 72, 88, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        model(x)
        model = restore_from_inference(model)
        assert [type(m) for m in model.modules()] == plain_types and not is_prepared(model)
        out, ref = model(x), plain(x)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_levit_stem_runs_channels_last_only_where_autograd_records_nothing():
    torch.manual_seed(0)
    model = create_backbone("levit_128s", out_features=["res2", "res3", "res4"])
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    seen = []
    handle = model.stem.conv2.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    try:
        with torch.no_grad():
            fast = model.eval()(x)
            ref = _set(model, False)(x)
        _set(model, True).train()(x)  # the stem's parameters are trained: NCHW, as timm
    finally:
        handle.remove()
    assert seen == [True, False, False]
    for k in ref:  # the outputs are plain NCHW tensors either way
        assert fast[k].is_contiguous() and (fast[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max(), k


@pytest.mark.parametrize("name", ["twins_pcpvt_small", "twins_svt_small", "pvt_tiny"])
def test_one_image_convs_read_the_channels_last_view_only_in_fast_inference(name):
    """PEG / sub-sampling convs of one image: the tokens' channels-last view (fast) or timm's NCHW copy."""
    torch.manual_seed(0)
    model = create_backbone(name, out_features=["res2", "res3"])
    convs = [m.sr for m in model.modules() if isinstance(m, layers.SpatialReductionAttention) and m.sr_ratio > 1]
    convs += [m.proj[0] for m in model.modules() if type(m).__name__ == "PositionEncodingGenerator"]
    assert convs
    seen = []
    handles = [c.register_forward_pre_hook(lambda m, args: seen.append(not args[0].is_contiguous())) for c in convs]
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    try:
        with torch.no_grad():
            fast = model.eval()(x)
            n = len(seen)
            ref = _set(model, False)(x)
        _set(model, True).train()(x)  # autograd records: the reference layout
    finally:
        for h in handles:
            h.remove()
    assert n > 0 and all(seen[:n]) and not any(seen[n:])
    for k in ref:
        assert fast[k].is_contiguous() and (fast[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max(), k


def test_gcvit_stem_runs_image_by_image_only_in_fast_inference_of_a_batch():
    torch.manual_seed(0)
    model = create_backbone("gcvit_xxtiny", out_features=["res2", "res3"])
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    batches = []
    handle = model.stem.conv1.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            fast = model.eval()(x)
            ref = _set(model, False)(x)
            _set(model, True)(x[:1])  # one image: nothing to split
        model.train()(x)  # autograd records: the whole batch at once
    finally:
        handle.remove()
    assert batches == [1, 1, 1, 3, 1, 3]
    for k in ref:
        assert fast[k].shape == ref[k].shape == (3,) + tuple(ref[k].shape[1:])
        assert (fast[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max(), k


def test_image_by_image_concatenates_in_order_and_keeps_the_memory_format():
    x = torch.randn(4, 2, 5, 6).contiguous(memory_format=torch.channels_last)
    out = kernels.image_by_image(lambda img: img * torch.arange(1.0, 3.0).view(1, 2, 1, 1) + img.sum(), x)
    expected = torch.cat([x[i:i + 1] * torch.arange(1.0, 3.0).view(1, 2, 1, 1) + x[i].sum() for i in range(4)])
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["twins_pcpvt_small", "twins_svt_small"])
def test_twins_patch_embeddings_read_the_channels_last_view_only_in_fast_inference(name):
    """Stages 2-4 of Twins: the previous stage's channels-last view (fast) or the reference's NCHW copy."""
    torch.manual_seed(0)
    model = create_backbone(name)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    seen = []
    handles = [pe.proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
               for pe in model.patch_embeds[1:]]
    try:
        with torch.no_grad():
            fast = model.eval()(x)
            ref = _set(model, False)(x)
        _set(model, True).train()(x)  # autograd records: the reference layout
    finally:
        for h in handles:
            h.remove()
    assert seen == [False] * 3 + [True] * 6
    for k in ref:
        assert (fast[k] - ref[k]).abs().max() <= 1e-5 * ref[k].abs().max(), k
