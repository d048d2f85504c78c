"""Export a pvt_d2 backbone or a whole detector, then check it against eager PyTorch.

In the spirit of detectron2's ``tools/deploy/export_model.py``::

    pvt-d2-export --config-file configs/mask_rcnn_pvt_v2_b0.yaml --format torchscript
    pvt-d2-export --config-file configs/mask_rcnn_levit_128s.yaml --format export --size 96x64
    pvt-d2-export --config-file configs/mask_rcnn_pvt_v2_b0.yaml --format onnx --output out/onnx
    pvt-d2-export --config-file configs/mask_rcnn_pvt_v2_b0.yaml --what detector \\
        --sample-image datasets/pvt_d2_synthetic/val/000000.png --opts MODEL.WEIGHTS output/quickstart/model_final.pth

Formats (``--format``):

* ``torchscript``: :func:`torch.jit.trace`, saved with :func:`torch.jit.save`
  (``backbone.ts`` / ``detector.ts``). The detector goes through detectron2's
  :class:`~detectron2.export.TracingAdapter` (images in, flattened
  ``Instances`` fields out, before the resize to the original image size).
* ``export``: :func:`torch.export.export` with a dynamic height and width
  (``backbone.pt2``), from the family's smallest size (:func:`dynamic_min_size`:
  17 for ViP and LeViT's window attention, 33 otherwise) to 4096; the program
  rejects sizes outside that range with torch.export's input-shape error.
  Should a backbone's graph not be size-general, it is exported at the fixed
  ``--size`` instead, with a note, and rejects any other size.
* ``onnx``: :func:`torch.onnx.export` (``backbone.onnx``) with dynamic height and
  width, checked with onnxruntime when it is installed. Needs the optional
  ``onnx`` extra (``pip install -e .[onnx]``).

``--what detector`` supports ``torchscript``. The model comes from the config
(``MODEL.PVT_D2.PRETRAINED`` defaults to "" so nothing is downloaded) plus
``MODEL.WEIGHTS`` if given. The exported model is run on a sample image
(``--sample-image``, or a seeded random image of ``--size``) at the export
size and at every ``--check-sizes`` size; the tool prints the maximum absolute
difference from eager PyTorch for each. Bad input (unknown format, missing
file, an output that exists without ``--overwrite``) prints one ``ERROR:``
line and exits with status 2.
"""
import argparse
import os
import sys
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx.experimental._config  # noqa: F401  (backed_size_oblivious, see export_program)
from torch import nn

from pvt_d2.checkpoint import bottom_up_backbone
from pvt_d2.utils.output import OutputPathError, check_output_path
from pvt_d2.config import ConfigError, load_config
from pvt_d2.utils.analysis import build_backbone, build_detector, parse_size

FORMATS = ("torchscript", "export", "onnx")
EXTENSIONS = {"torchscript": "ts", "export": "pt2", "onnx": "onnx"}
DETECTOR_FORMATS = ("torchscript",)


class ExportError(Exception):
    """Bad input to the exporter (reported as one ``ERROR:`` line, exit status 2)."""


class BackboneOutputs(nn.Module):
    """A backbone that returns its levels as a tuple in ``out_features`` order (what trace / ONNX need)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.names = list(backbone.output_shape())

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        out = self.backbone(x)
        return tuple(out[k] for k in self.names)


#: Smallest image side of the dynamic torch.export program (default for every family).
#: Below it a size-dependent guard cannot be avoided: the stride-32 level must be larger
#: than 1x1 (export picks the memory format of a convolution on a 1x1 channels-last map,
#: and PVT v1's position-embedding upsampling, by a guard; LeViT's global attention
#: asserts more than one key).
DEFAULT_MIN_SIZE = 33
#: Families that go lower: LeViT in window mode and ViP only need a stride-16 grid
#: larger than 1x1.
DYNAMIC_MIN_SIZE = {"LevitBackbone": 17, "VisionPermutator": 17}
MAX_SIZE = 4096


def dynamic_min_size(backbone: nn.Module) -> int:
    """Smallest height / width the dynamic torch.export program of ``backbone`` accepts."""
    if getattr(backbone, "attn_mode", "window") != "window":  # LeViT's global attention
        return DEFAULT_MIN_SIZE
    return DYNAMIC_MIN_SIZE.get(type(backbone).__name__, DEFAULT_MIN_SIZE)


def dynamic_hw(min_size: int = DEFAULT_MIN_SIZE, max_size: int = MAX_SIZE):
    """``dynamic_shapes`` for one ``(B, C, H, W)`` input with a dynamic height and width."""
    h = torch.export.Dim("height", min=min_size, max=max_size)
    w = torch.export.Dim("width", min=min_size, max=max_size)
    return ({2: h, 3: w},)


def export_program(module: nn.Module, example: torch.Tensor, dynamic: bool = True, min_size: Optional[int] = None):
    """:func:`torch.export.export` of ``module``, dynamic in H and W when possible.

    The export runs with PyTorch's ``backed_size_oblivious`` shape reasoning:
    whether a reshape is a view, or whether a tensor is contiguous, depends on
    whether a size is 1 (one attention window, a 1x1 level), and plain
    reasoning would turn each such question into a guard on the input size.
    Size-oblivious reasoning takes the general answer and adds a run-time
    check where the answer matters; the backbones copy explicitly while they
    are recorded (:func:`pvt_d2.modeling.backbone.export_ops.to_contiguous`), so
    the general answer holds at every size in the range (the tests check
    sizes with one window per stage).

    Args:
        module: the module to export (one image tensor in).
        example: example input ``(B, C, H, W)``.
        dynamic: try a program dynamic in H and W first.
        min_size: smallest height / width of the dynamic program (default:
            :func:`dynamic_min_size` of the backbone inside ``module``).

    Returns:
        ``(program, dynamic)``: the exported program and whether it is size-general.
        When the dynamic export fails, the module is exported at the example size,
        and the program rejects any other size.
    """
    if dynamic:
        if min_size is None:
            min_size = dynamic_min_size(getattr(module, "backbone", module))
        if min(example.shape[-2:]) < min_size:
            raise ExportError(f"the export size {example.shape[-2]}x{example.shape[-1]} (H x W) is below "
                              f"the smallest size {min_size} of a dynamic torch.export program of this backbone")
        try:
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                program = torch.export.export(module, (example,), dynamic_shapes=dynamic_hw(min_size))
            return program, True
        except Exception as e:  # noqa: BLE001  (torch raises several kinds for unsupported dynamism)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"NOTE: no dynamic-size export ({type(e).__name__}: {first[:200]}); "
                  f"exporting at the fixed size {example.shape[-2]}x{example.shape[-1]} (H x W): "
                  "the program rejects other sizes")
    return torch.export.export(module, (example,)), False


def max_difference(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over matching tensors; ``inf`` when shapes or counts differ."""
    if len(expected) != len(actual):
        return float("inf")
    diff = 0.0
    for e, a in zip(expected, actual):
        a = torch.as_tensor(a)
        if tuple(e.shape) != tuple(a.shape):
            return float("inf")
        if e.numel():
            diff = max(diff, (e.float() - a.float()).abs().max().item())
    return diff


# ---------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------
def export_backbone(backbone: nn.Module, fmt: str, example: torch.Tensor, path: str) -> Tuple[Callable, str]:
    """Export ``backbone`` in ``fmt`` to ``path``; returns a runner of the saved file and a description."""
    module = BackboneOutputs(backbone).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            with torch.no_grad():
                traced = torch.jit.trace(module, (example,), check_trace=False)
            torch.jit.save(traced, path)
            loaded = torch.jit.load(path)
            return (lambda x: loaded(x)), "TorchScript trace"
        if fmt == "export":
            program, dynamic = export_program(module, example)
            torch.export.save(program, path)
            loaded = torch.export.load(path).module()
            how = f"dynamic H and W in [{dynamic_min_size(backbone)}, {MAX_SIZE}]" if dynamic else "fixed size"
            return (lambda x: loaded(x)), "torch.export, " + how
        return _export_onnx(module, example, path)


def _export_onnx(module: nn.Module, example: torch.Tensor, path: str) -> Tuple[Callable, str]:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ExportError("--format onnx needs the 'onnx' package: pip install -e .[onnx] "
                          "(onnx, onnxscript; onnxruntime to check the result)") from None
    names = [f"out_{n}" for n in module.names]
    axes = {"image": {2: "height", 3: "width"}, **{n: {2: f"{n}_h", 3: f"{n}_w"} for n in names}}

    def write(dynamic_axes):
        with torch.no_grad():
            torch.onnx.export(module, (example,), path, input_names=["image"], output_names=names,
                              dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)

    write(axes)
    try:
        import onnxruntime
    except ImportError:
        print("NOTE: onnxruntime is not installed; the ONNX file is written but not run")
        return None, "ONNX (not run)"

    def session_runner():
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {"image": x.numpy()})]

    # A graph that does not follow the size must not return wrong shapes: probe one other
    # size and fall back to fixed axes (onnxruntime then rejects other sizes).
    run = session_runner()
    probe = torch.nn.functional.pad(example, (0, 17, 0, 13))
    with torch.no_grad():
        expected = [tuple(t.shape) for t in module(probe)]
    try:
        general = [tuple(t.shape) for t in run(probe)] == expected
    except Exception:  # noqa: BLE001  (onnxruntime raises its own error types)
        general = False
    if general:
        return run, "ONNX via onnxruntime, dynamic H and W"
    print(f"NOTE: the ONNX graph does not follow the input size; exporting at the fixed size "
          f"{example.shape[-2]}x{example.shape[-1]} (H x W): onnxruntime rejects other sizes")
    write(None)
    return session_runner(), "ONNX via onnxruntime, fixed size"


# ---------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------
def _detector_inference(model, inputs):
    """Detections before ``detector_postprocess`` (sizes of the network input), as in detectron2's exporter."""
    instances = model.inference(inputs, do_postprocess=False)[0]
    return [{"instances": instances}]


def _flatten_instances(outputs) -> List[torch.Tensor]:
    inst = outputs[0]["instances"]
    return [inst.get(k).tensor if hasattr(inst.get(k), "tensor") else inst.get(k)
            for k in sorted(inst.get_fields())]


def export_detector(model: nn.Module, image: torch.Tensor, path: str) -> Tuple[Callable, Callable, str]:
    """TracingAdapter trace of a detector to ``path``.

    Returns:
        ``(run_exported, run_eager, description)``; both runners take a ``(3, H, W)``
        image and return the flattened detection fields (sorted by name).
    """
    from detectron2.export import TracingAdapter

    adapter = TracingAdapter(model, [{"image": image}], _detector_inference)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    torch.jit.save(traced, path)
    loaded = torch.jit.load(path)

    def run_exported(img):
        return _flatten_instances(adapter.outputs_schema(loaded(img)))

    def run_eager(img):
        return _flatten_instances(_detector_inference(model, [{"image": img}]))

    return run_exported, run_eager, "TorchScript trace (detectron2 TracingAdapter)"


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def sample_image(cfg, path: str, height: int, width: int) -> torch.Tensor:
    """A ``(3, H, W)`` float image in the model's input format (``cfg.INPUT.FORMAT``, 0-255)."""
    if not path:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (3, height, width), generator=g).float()
    if not os.path.isfile(path):
        raise ExportError(f"--sample-image {path}: no such file")
    from pvt_d2.data.mapper import read_image  # the reader of training and evaluation

    try:
        img = read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as e:  # noqa: BLE001  (PIL raises several kinds on bad files)
        raise ExportError(f"--sample-image {path}: cannot read it as an image ({e})") from None
    return torch.as_tensor(img.astype("float32").transpose(2, 0, 1).copy())


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image.shape[-2:]) == (height, width):
        return image
    return torch.nn.functional.interpolate(image[None], size=(height, width), mode="bilinear",
                                           align_corners=False)[0]


def normalize(cfg, image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1)
    return ((image - mean) / std)[None]


def build(cfg, what: str) -> nn.Module:
    """The config's backbone or detector on the CPU in eval mode, with ``MODEL.WEIGHTS`` if set."""
    if what == "backbone" and not cfg.MODEL.WEIGHTS:
        return build_backbone(cfg, "cpu")
    model = build_detector(cfg, "cpu")
    if cfg.MODEL.WEIGHTS:
        if not os.path.isfile(cfg.MODEL.WEIGHTS):
            raise ExportError(f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: no such file")
        from pvt_d2.checkpoint import AtomicCheckpointer

        AtomicCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
    return model if what == "detector" else bottom_up_backbone(model).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--what", default="backbone", help="backbone (default) or detector")
    parser.add_argument("--output", default="output/export", help="folder for the exported file")
    parser.add_argument("--size", default="96x64", help="export size WIDTHxHEIGHT (default 96x64)")
    parser.add_argument("--check-sizes", nargs="*", default=["131x97", "61x75"],
                        help="other WIDTHxHEIGHT sizes to compare at (default 131x97 61x75)")
    parser.add_argument("--sample-image", default="", help="image file to run (default: a random image)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing exported file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ExportError, ConfigError, ValueError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"ERROR: {message}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.format not in FORMATS:
        raise ExportError(f"unknown --format '{args.format}'; choose one of {', '.join(FORMATS)}")
    if args.what not in ("backbone", "detector"):
        raise ExportError(f"unknown --what '{args.what}'; choose backbone or detector")
    if args.what == "detector" and args.format not in DETECTOR_FORMATS:
        raise ExportError(f"--what detector supports --format {', '.join(DETECTOR_FORMATS)}; "
                          f"export the backbone for '{args.format}'")
    if not os.path.isfile(args.config_file):
        raise ExportError(f"--config-file {args.config_file}: no such file")
    height, width = parse_size(args.size)
    checks = [parse_size(s) for s in args.check_sizes]
    path = os.path.join(args.output, f"{args.what}.{EXTENSIONS[args.format]}")
    try:  # before the model is built and exported: a result is never computed and then lost
        check_output_path(args.output, "dir", what="--output", create=False)
        check_output_path(path, "file", overwrite=args.overwrite, what="the exported file", create=False)
    except OutputPathError as e:
        raise ExportError(str(e)) from None
    cfg = load_config(args.config_file, args.opts)
    image = sample_image(cfg, args.sample_image, height, width)
    torch.manual_seed(0)
    model = build(cfg, args.what)
    os.makedirs(args.output, exist_ok=True)

    if args.what == "backbone":
        run_exported, how = export_backbone(model, args.format, normalize(cfg, image), path)

        def run_eager(img):
            out = model(normalize(cfg, img))
            return [out[k] for k in model.output_shape()]

        def run_file(img):
            return list(run_exported(normalize(cfg, img)))
    else:
        run_file, run_eager, how = export_detector(model, image, path)

    print(f"exported {cfg.MODEL.PVT_D2.ARCH} {args.what} ({how}) to {path}")
    if run_file is None:
        return 0
    rows = []
    for h, w in [(height, width)] + checks:
        img = resize_image(image, h, w)
        with torch.no_grad():
            expected = run_eager(img)
            try:
                diff, note = max_difference(expected, run_file(img)), ""
            except Exception as e:  # noqa: BLE001  (a fixed-size program refuses other sizes)
                diff, note = float("nan"), f"refused: {str(e).strip().splitlines()[0][:160]}"
        label = "export size" if (h, w) == (height, width) else "other size"
        rows.append((f"{w}x{h}", label, diff, note))
    for size, label, diff, note in rows:
        print(f"  {size:>10} ({label}): max |exported - eager| = {diff:.3g}" + (f"  [{note}]" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
