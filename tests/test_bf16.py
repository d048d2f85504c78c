"""``--amp fp32|fp16|bf16`` (pvt_d2/utils/precision.py, tools) and ``tools/benchmark.py --what train``."""
import re

import pytest
import torch

from pvt_d2.utils import precision
from pvt_d2.utils.precision import AutocastBackbone, autocast_backbone, resolve_amp
from conftest import tiny_train_cfg

NATIVE_BF16 = precision.cpu_supports_bf16()


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU without AVX512-BF16 / AMX."""
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)


def test_resolve_amp_choices():
    assert resolve_amp("fp32", "cpu") == (None, "")
    with pytest.raises(ValueError, match="--amp must be one of fp32, fp16, bf16, auto, got 'int8'"):
        resolve_amp("int8", "cpu")
    dtype, note = resolve_amp("bf16", "cpu")
    assert (dtype, note == "") == ((torch.bfloat16, True) if NATIVE_BF16 else (None, False))
    assert resolve_amp("auto", "cpu") == resolve_amp("bf16", "cpu")


def test_bf16_falls_back_without_native_support(no_native_bf16):
    dtype, note = resolve_amp("bf16", "cpu")
    assert dtype is None
    assert "no native bfloat16 (AVX512-BF16 or AMX)" in note and "running in float32" in note


def _tiny_detector(tmp_path):
    from pvt_d2.utils.analysis import build_detector

    cfg = tiny_train_cfg("mask_rcnn_pvt_v2_b0.yaml", str(tmp_path))
    torch.manual_seed(0)
    return build_detector(cfg, "cpu")


def _detect(model):
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        return model([{"image": image, "height": 96, "width": 128}])[0]["instances"]


def test_autocast_backbone_outputs_are_float32(tmp_path):
    model = _tiny_detector(tmp_path)
    model.roi_heads.box_predictor.test_score_thresh = 0.0  # random weights: keep every detection
    ref = _detect(model)
    trunk_dtypes = []
    model.backbone.bottom_up.register_forward_hook(lambda m, i, o: trunk_dtypes.append(o["res5"].dtype))
    dtype = autocast_backbone(model, "bf16")
    assert isinstance(model.backbone, AutocastBackbone) and model.backbone.size_divisibility == 32
    out = _detect(model)
    assert trunk_dtypes == [torch.bfloat16 if NATIVE_BF16 else torch.float32]
    assert dtype == (torch.bfloat16 if NATIVE_BF16 else None)
    assert len(out) > 0 and len(ref) > 0
    assert out.pred_boxes.tensor.dtype == torch.float32
    assert out.scores.dtype == torch.float32
    assert out.pred_masks.dtype in (torch.bool, torch.float32)
    features = model.backbone(torch.rand(1, 3, 96, 128))
    assert all(v.dtype == torch.float32 for v in features.values())


def test_autocast_backbone_falls_back_to_float32(tmp_path, no_native_bf16, caplog):
    model = _tiny_detector(tmp_path)
    backbone = model.backbone
    assert autocast_backbone(model, "bf16") is None
    assert model.backbone is backbone
    assert "running in float32" in caplog.text


def _benchmark_main(argv, capsys):
    from pvt_d2.cli import benchmark

    rc = benchmark.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_benchmark_backbone_amp_bf16(capsys):
    rc, out, err = _benchmark_main(["--config-file", "configs/mask_rcnn_pvt_v2_b0.yaml", "--device", "cpu",
                                    "--what", "backbone", "--amp", "bf16", "--size", "64x48", "--iters", "1",
                                    "--warmup", "0", "--opts", "MODEL.PVT_D2.PRETRAINED", ""], capsys)
    assert rc == 0
    if NATIVE_BF16:
        assert re.search(r"^backbone: [\d.]+ ms/iter.*\[cpu, bfloat16 autocast, batch 1, 64x48\]$", out, re.M)
    else:
        assert "WARNING: --amp bf16" in err and "backbone:" in out


def test_benchmark_amp_falls_back_with_warning(capsys, no_native_bf16):
    rc, out, err = _benchmark_main(["--config-file", "configs/mask_rcnn_pvt_v2_b0.yaml", "--device", "cpu",
                                    "--what", "backbone", "--amp", "bf16", "--size", "64x48", "--iters", "1",
                                    "--warmup", "0", "--opts", "MODEL.PVT_D2.PRETRAINED", ""], capsys)
    assert rc == 0
    assert "WARNING: --amp bf16: this CPU has no native bfloat16" in err
    assert re.search(r"^backbone: [\d.]+ ms/iter.*\[cpu, float32, batch 1, 64x48\]$", out, re.M)


@pytest.mark.slow
def test_benchmark_train_throughput(tmp_path, capsys):
    cfg = tiny_train_cfg("mask_rcnn_pvt_v2_b0.yaml", str(tmp_path))
    opts = ["DATASETS.TRAIN", "('synthetic_train',)", "MODEL.ROI_HEADS.NUM_CLASSES", "4",
            "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
            "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128",
            "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.PVT_D2.PRETRAINED", "",
            "OUTPUT_DIR", cfg.OUTPUT_DIR]
    rc, out, err = _benchmark_main(["--config-file", "configs/mask_rcnn_pvt_v2_b0.yaml", "--device", "cpu",
                                    "--what", "train", "--iters", "2", "--warmup", "1",
                                    "--json", str(tmp_path / "train.json"), "--opts"] + opts, capsys)
    assert rc == 0, err
    assert "training, 2 images per iteration, float32" in out
    rates = re.findall(r"data loading (excluded|included).*: ([\d.]+) iter/s, ([\d.]+) img/s", out)
    assert [r[0] for r in rates] == ["excluded", "included"]
    for _, its, ims in rates:
        assert float(its) > 0 and float(ims) == pytest.approx(2 * float(its), rel=0.02)
    import json

    saved = json.loads((tmp_path / "train.json").read_text())["train"]
    assert len(saved["fixed_batch"]["times_s"]) == 2 and len(saved["with_loader"]["times_s"]) == 2


def test_benchmark_train_unknown_dataset_is_one_error_line(capsys):
    rc, out, err = _benchmark_main(["--config-file", "configs/mask_rcnn_pvt_v2_b0.yaml", "--device", "cpu",
                                    "--what", "train", "--iters", "1", "--opts", "DATASETS.TRAIN",
                                    "('no_such_dataset',)", "MODEL.PVT_D2.PRETRAINED", ""], capsys)
    assert rc == 2
    assert err.startswith("ERROR: ") and "no_such_dataset" in err


def test_train_net_amp_needs_eval_only(tmp_path, capsys):
    from pvt_d2.cli import train_net

    rc = train_net.cli(["--config-file", "configs/quickstart_pvt_v2_b0.yaml", "--amp", "bf16",
                        "OUTPUT_DIR", str(tmp_path / "out")])
    assert rc == 2
    assert "ERROR: --amp bf16 applies to --eval-only" in capsys.readouterr().err


# --------------------------------------------------------------------------- bfloat16 attention (CPU inference)


@pytest.mark.parametrize("batch,heads,queries,keys,budget", [(1, 1, 300, 20, 2 ** 12), (2, 3, 50, 17, 512),
                                                             (1, 2, 40, 9, 2 ** 20)])
def test_bf16_attention_matches_float32_attention(batch, heads, queries, keys, budget):
    """Chunked (several chunks, ragged last one) or whole; token-major output; bfloat16 rounding only."""
    from pvt_d2.inference.kernels import bf16_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, queries, heads, 32, generator=g).transpose(1, 2)  # the strides SRA passes
    k, v = (torch.randn(batch, heads, keys, 32, generator=g) for _ in range(2))
    scale = 32 ** -0.5
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)
    out = bf16_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale, budget=budget)
    assert out.dtype == torch.bfloat16 and out.shape == (batch, queries, heads, 32) and out.is_contiguous()
    err = (out.float() - expected).abs().max().item()
    assert 0 < err < 3e-2, err


def test_spatial_reduction_attention_bf16_inference_path(monkeypatch):
    """bfloat16 CPU inference takes the chunked path; float32 and autograd keep SDPA, same function."""
    from pvt_d2.inference import modules, prepare_for_inference
    from pvt_d2.modeling.backbone import layers

    torch.manual_seed(0)
    sra = prepare_for_inference(layers.SpatialReductionAttention(64, 2, sr_ratio=2)).eval()
    x = torch.randn(2, 16 * 12, 64)
    with torch.no_grad():
        ref = sra(x, (16, 12))
    calls = []
    original = modules.bf16_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(modules, "bf16_attention", spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sra(x, (16, 12))
    assert calls == [(2, 2, 192, 32)]
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 5e-2
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sra(x, (16, 12)).float().sum().backward()  # autograd: SDPA, gradients flow
    assert len(calls) == 1 and x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(sra(x.detach(), (16, 12)), ref)  # float32: unchanged
    assert len(calls) == 1


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bfloat16")
def test_packed_linear_under_bf16_autocast():
    """Inference under CPU bf16 autocast: a bfloat16 pack made once, F.linear's autocast result."""
    from pvt_d2.inference.cache import cache_slot
    from pvt_d2.inference.kernels import PackedLinear

    torch.manual_seed(0)
    lin = PackedLinear(96, 200).eval()
    packs = lambda: {k[0]: v[1][0] for k, v in cache_slot(lin, "packed_linear").items()}  # noqa: E731
    x = torch.randn(3, 50, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)  # autocast: weight cast on every call
        gelu = lin.forward_act(x, "gelu")
        again = lin(x.bfloat16())
    assert y.dtype == ref.dtype == gelu.dtype == torch.bfloat16
    assert (y.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    assert torch.equal(again, y)  # a float32 input is rounded to bfloat16 first, as autocast does
    assert (gelu.float() - torch.nn.functional.gelu(y.float())).abs().max() <= 1e-2 * y.float().abs().max()
    assert packs()[torch.bfloat16].dtype == torch.bfloat16 and torch.float32 not in packs()
    with torch.no_grad():
        assert lin(x).dtype == torch.float32 and torch.float32 in packs()  # outside autocast: float32
