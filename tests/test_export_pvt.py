"""Export-correctness of PVT v1, PVT v2 and Twins backbones (issue 17, item 2).

A ``torch.jit.trace`` taken at one size must give eager's result at other
sizes, including odd ones: padding to a multiple and position-embedding
resizing are recorded from the input size (see
:func:`pvt_d2.modeling.backbone.layers.is_tracing`) instead of being baked in.
PVT v1, PVT v2 and Twins-PCPVT also export with ``torch.export`` for any
height and width of at least 64 px (the spatial-reduction grids are then never
smaller than one cell; the program asserts it). Twins-SVT's window count
specializes, so its ``torch.export`` is fixed-size.
"""
import pytest
import torch

from pvt_d2.modeling.backbone import create_backbone

EXPORT_HW = (64, 96)
OTHER_HW = [(97, 131), (75, 61)]
TOL = 1e-4


class _Outputs(torch.nn.Module):
    """The backbone's levels as a tuple (trace / export want tensors, not a dict)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return tuple(self.backbone(x).values())


def _model(arch):
    torch.manual_seed(0)
    return _Outputs(create_backbone(arch).eval()).eval()


def _image(h, w):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


def _max_diff(expected, got):
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
    return max((a - b).abs().max().item() for a, b in zip(expected, got))


@pytest.mark.parametrize("arch", ["pvt_tiny", "pvt_v2_b0", "twins_pcpvt_small", "twins_svt_small"])
def test_trace_follows_the_input_size(arch):
    model = _model(arch)
    with torch.no_grad():
        traced = torch.jit.trace(model, (_image(*EXPORT_HW),), check_trace=False)
        for hw in [EXPORT_HW] + OTHER_HW:
            x = _image(*hw)
            assert _max_diff(model(x), traced(x)) < TOL, (arch, hw)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["pvt_tiny", "twins_svt_small"])
def test_trace_at_333x517(arch):
    model = _model(arch)
    with torch.no_grad():
        traced = torch.jit.trace(model, (_image(320, 480),), check_trace=False)
        x = _image(333, 517)
        assert _max_diff(model(x), traced(x)) < TOL


@pytest.mark.parametrize("arch", ["pvt_v2_b0", pytest.param("pvt_tiny", marks=pytest.mark.slow),
                                  pytest.param("twins_pcpvt_small", marks=pytest.mark.slow)])
def test_torch_export_dynamic_height_and_width(arch):
    model = _model(arch)
    dims = {2: torch.export.Dim("height", min=64, max=4096), 3: torch.export.Dim("width", min=64, max=4096)}
    program = torch.export.export(model, (_image(*EXPORT_HW),), dynamic_shapes=(dims,))
    module = program.module()
    with torch.no_grad():
        for hw in [EXPORT_HW, (97, 131), (67, 75)]:
            x = _image(*hw)
            assert _max_diff(model(x), module(x)) < TOL, hw
