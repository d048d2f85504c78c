"""Export of backbones and detectors (tools/export_model.py): trace, torch.export, ONNX.

Every family's exported backbone must equal eager PyTorch at sizes other than
the one it was exported at, or refuse them with an error (never return wrong
shapes). Add a family by appending to ``EXPORT_CASES``.
"""
import os

import pytest
import torch

from conftest import CONFIGS
from pvt_d2.modeling.backbone import create_backbone
from tools.export_model import BackboneOutputs, export_backbone, export_program, main, max_difference

#: (arch, constructor overrides, torch.export is size-general). The trace of
#: every listed variant must be size-general.
EXPORT_CASES = [
    ("levit_128s", {}, False),
    ("levit_128s", {"attn_mode": "global"}, False),
    ("gcvit_xxtiny", {"window_sizes": (24, 24, 24, 24)}, False),
    ("gcvit_xxtiny", {"window_sizes": (7, 7, 7, 7), "mask_padding": True}, False),
    ("vip_s14", {}, False),
]
EXPORT_HW = (64, 96)
OTHER_HW = [(97, 131), (75, 61)]
TOL = 1e-4


def _ids(case):
    arch, kwargs, _ = case
    return arch + "".join(f"-{k}={v}" for k, v in kwargs.items()).replace(" ", "")


def _model(arch, kwargs):
    torch.manual_seed(0)
    backbone = create_backbone(arch, out_features=["res2", "res3", "res4", "res5"], **kwargs).eval()
    return BackboneOutputs(backbone).eval()


def _eager(model, x):
    with torch.no_grad():
        return list(model(x))


def _image(h, w, seed=1):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", EXPORT_CASES, ids=_ids)
def test_trace_follows_the_input_size(case):
    arch, kwargs, _ = case
    model = _model(arch, kwargs)
    with torch.no_grad():
        traced = torch.jit.trace(model, (_image(*EXPORT_HW),), check_trace=False)
    for hw in [EXPORT_HW] + OTHER_HW:
        x = _image(*hw, seed=hw[0])
        expected = _eager(model, x)
        with torch.no_grad():
            got = traced(x)
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
        assert max_difference(expected, got) < TOL, hw


@pytest.mark.parametrize("case", EXPORT_CASES, ids=_ids)
def test_torch_export_is_size_general_or_refuses(case):
    arch, kwargs, dynamic_expected = case
    model = _model(arch, kwargs)
    program, dynamic = export_program(model, _image(*EXPORT_HW))
    assert dynamic == dynamic_expected
    module = program.module()
    with torch.no_grad():
        assert max_difference(_eager(model, _image(*EXPORT_HW)), module(_image(*EXPORT_HW))) < TOL
    for hw in OTHER_HW:
        x = _image(*hw, seed=hw[0])
        if dynamic:
            with torch.no_grad():
                assert max_difference(_eager(model, x), module(x)) < TOL, hw
        else:
            with pytest.raises(Exception, match="size|shape|Guard"), torch.no_grad():
                module(x)


@pytest.mark.slow
def test_trace_at_a_large_odd_size():
    model = _model("levit_128s", {})
    with torch.no_grad():
        traced = torch.jit.trace(model, (_image(*EXPORT_HW),), check_trace=False)
        x = _image(333, 517)
        assert max_difference(_eager(model, x), traced(x)) < TOL


def test_onnx_backbone_at_other_sizes(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _model("levit_128s", {})
    run, how = export_backbone(model.backbone, "onnx", _image(*EXPORT_HW), str(tmp_path / "b.onnx"))
    assert "onnxruntime" in how
    for hw in [EXPORT_HW] + OTHER_HW[:1]:
        x = _image(*hw, seed=hw[0])
        assert max_difference(_eager(model, x), run(x)) < TOL, hw


@pytest.mark.slow
def test_mask_rcnn_trace_matches_eager_detections(tmp_path):
    from detectron2.modeling import build_model

    from pvt_d2.config import load_config
    from tools.export_model import export_detector

    cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b0.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "20"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 96), generator=g).float()
    run_file, run_eager, how = export_detector(model, image, str(tmp_path / "detector.ts"))
    assert "TracingAdapter" in how
    for h, w in [(64, 96), (75, 61)]:
        img = torch.randint(0, 256, (3, h, w), generator=g).float()
        with torch.no_grad():
            expected, got = run_eager(img), run_file(img)
        assert expected[0].shape[0] > 0  # some detections to compare
        assert max_difference(expected, got) < TOL, (h, w)


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    cfg = os.path.join(CONFIGS, "mask_rcnn_levit_128s.yaml")
    assert main(["--config-file", cfg, "--format", "tflite", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR: unknown --format 'tflite'")
    assert main(["--config-file", cfg, "--format", "torchscript", "--sample-image", str(tmp_path / "none.png"),
                 "--output", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--config-file", cfg, "--format", "export", "--what", "detector", "--output", str(tmp_path)]) == 2
    assert "supports --format torchscript" in capsys.readouterr().err


def test_cli_exports_and_never_overwrites(tmp_path, capsys):
    cfg = os.path.join(CONFIGS, "mask_rcnn_levit_128s.yaml")
    args = ["--config-file", cfg, "--format", "torchscript", "--output", str(tmp_path), "--check-sizes", "61x75"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert os.path.isfile(tmp_path / "backbone.ts")
    diffs = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "max |exported - eager|" in line]
    assert len(diffs) == 2 and max(diffs) < TOL
    stamp = os.path.getmtime(tmp_path / "backbone.ts")
    assert main(args) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert os.path.getmtime(tmp_path / "backbone.ts") == stamp
    assert main(args + ["--overwrite"]) == 0
