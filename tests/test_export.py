"""Export of backbones and detectors (tools/export_model.py): trace, torch.export, ONNX.

Every family's exported backbone must equal eager PyTorch at sizes other than
the one it was exported at, including odd ones: a :func:`torch.jit.trace`
taken at 96x64 and a :func:`torch.export.export` program with a dynamic
height and width (from the family's smallest size, see
``tools.export_model.DYNAMIC_MIN_SIZE``) are run at 131x97, 61x75 and at the
smallest size, where the deepest stages hold one window / one cell. Add a
family by appending to ``EXPORT_CASES``.
"""
import os

import pytest
import torch

from conftest import CONFIGS
from pvt_d2.modeling.backbone import create_backbone
from pvt_d2.cli.export_model import (
    BackboneOutputs,
    ExportError,
    dynamic_min_size,
    export_backbone,
    export_program,
    main,
    max_difference,
)

#: (arch, constructor overrides): every family's small variant, plus LeViT's
#: global attention and GC ViT's ImageNet-size windows with masked padding.
EXPORT_CASES = [
    ("pvt_tiny", {}),
    ("pvt_v2_b0", {}),
    ("twins_pcpvt_small", {}),
    ("twins_svt_small", {}),
    ("levit_128s", {}),
    ("levit_128s", {"attn_mode": "global"}),
    ("gcvit_xxtiny", {"window_sizes": (24, 24, 24, 24)}),
    ("gcvit_xxtiny", {"window_sizes": (7, 7, 7, 7), "mask_padding": True}),
    ("vip_s14", {}),
]
EXPORT_HW = (64, 96)
OTHER_HW = [(97, 131), (75, 61)]
LARGE_ODD_HW = (333, 517)
TOL = 1e-4


def _ids(case):
    arch, kwargs = case
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


def _assert_matches(model, run, sizes):
    for hw in sizes:
        x = _image(*hw, seed=hw[0])
        expected = _eager(model, x)
        with torch.no_grad():
            got = list(run(x))
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected], hw
        assert max_difference(expected, got) < TOL, hw


def _trace(model):
    with torch.no_grad():
        return torch.jit.trace(model, (_image(*EXPORT_HW),), check_trace=False)


@pytest.mark.parametrize("case", EXPORT_CASES, ids=_ids)
def test_trace_follows_the_input_size(case):
    model = _model(*case)
    _assert_matches(model, _trace(model), [EXPORT_HW] + OTHER_HW)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c[1].get("mask_padding") else c
                                  for c in EXPORT_CASES], ids=_ids)
def test_torch_export_is_dynamic_in_height_and_width(case):
    model = _model(*case)
    program, dynamic = export_program(model, _image(*EXPORT_HW))
    assert dynamic
    smallest = dynamic_min_size(model.backbone)
    # the smallest size (odd width): the deepest levels are 1 cell / 1 window wide
    _assert_matches(model, program.module(), [EXPORT_HW] + OTHER_HW + [(smallest, smallest + 2)])
    with pytest.raises(Exception, match="Guard failed|size|shape"), torch.no_grad():
        program.module()(_image(smallest - 1, 64))


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPORT_CASES, ids=_ids)
def test_trace_and_export_at_a_large_odd_size(case):
    model = _model(*case)
    program, _ = export_program(model, _image(*EXPORT_HW))
    _assert_matches(model, _trace(model), [LARGE_ODD_HW])
    _assert_matches(model, program.module(), [LARGE_ODD_HW])


def test_dynamic_export_refuses_an_example_below_the_smallest_size():
    model = _model("gcvit_xxtiny", {"window_sizes": (24, 24, 24, 24)})
    with pytest.raises(ExportError, match="below the smallest size 33"):
        export_program(model, _image(32, 40))


def test_smallest_dynamic_sizes():
    sizes = {arch + "".join(kwargs.values()): dynamic_min_size(_model(arch, kwargs).backbone)
             for arch, kwargs in [("pvt_tiny", {}), ("levit_128s", {}), ("levit_128s", {"attn_mode": "global"}),
                                  ("vip_s14", {}), ("gcvit_xxtiny", {})]}
    assert sizes == {"pvt_tiny": 33, "levit_128s": 17, "levit_128sglobal": 33, "vip_s14": 17, "gcvit_xxtiny": 33}


@pytest.mark.parametrize("arch", ["levit_128s", pytest.param("vip_s14", marks=pytest.mark.slow)])
def test_onnx_backbone_with_dynamic_axes(tmp_path, arch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = _model(arch, {})
    run, how = export_backbone(model.backbone, "onnx", _image(*EXPORT_HW), str(tmp_path / "b.onnx"))
    assert how == "ONNX via onnxruntime, dynamic H and W"
    _assert_matches(model, run, [EXPORT_HW] + OTHER_HW)


@pytest.mark.slow
def test_mask_rcnn_trace_matches_eager_detections(tmp_path):
    from detectron2.modeling import build_model

    from pvt_d2.config import load_config
    from pvt_d2.cli.export_model import export_detector

    cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_v2_b0.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.PVT_D2.PRETRAINED", ""])
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
