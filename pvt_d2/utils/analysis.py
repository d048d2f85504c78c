"""Measuring models: parameters, FLOPs, latency and peak memory.

Shared by ``tools/analyze_model.py``, ``tools/benchmark.py`` and
``tools/model_zoo.py``. Conventions used throughout:

- Sizes are given on the command line as ``WIDTHxHEIGHT`` (``1333x800``) or
  as one number for a square; functions take ``(height, width)``.
- FLOPs follow fvcore (and the papers): one fused multiply-add counts as one
  FLOP. fvcore has no rule for ``scaled_dot_product_attention``, which every
  pvt_d2 backbone uses, so :func:`sdpa_flop_jit` supplies one (the two matrix
  products ``Q K^T`` and ``A V``; the softmax is not counted, like other
  element-wise ops). Ops without a rule are skipped without warnings and
  reported by :func:`flop_analysis`'s ``unsupported_ops()``.
- Peak memory is the increase over the memory in use just before the
  measured code: on CUDA from ``torch.cuda.max_memory_allocated``; on the CPU
  from the resident set size (RSS), sampled in a background thread and
  checked against the process's RSS high-water mark (``getrusage``).
"""
import contextlib
import ctypes
import math
import os
import resource
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import bottom_up_backbone

__all__ = [
    "parse_size",
    "count_parameters",
    "build_backbone",
    "build_detector",
    "detector_parameter_counts",
    "sdpa_flop_jit",
    "flop_analysis",
    "random_images",
    "detector_inputs",
    "PeakMemory",
    "BenchmarkResult",
    "run_benchmark",
    "autocast",
    "autocast_dtype",
]

def parse_size(text) -> Tuple[int, int]:
    """``"1333x800"`` (width x height) or ``"512"`` (square) -> ``(height, width)``.

    Raises:
        ValueError: anything else, or a side smaller than 1.
    """
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise ValueError(f"Image size must be WIDTHxHEIGHT (e.g. 1333x800) or one number, got '{text}'")
    width, height = (values * 2)[:2]
    return height, width


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _cpu_cfg(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def build_backbone(cfg, device: str = "cpu") -> nn.Module:
    """The bottom-up backbone a config's detector would use (``MODEL.PVT_D2.*``), in eval mode on ``device``.

    Only the backbone is built, which is much faster than the whole detector.
    Works for any ``MODEL.BACKBONE.NAME``: configs that do not use a pvt_d2
    builder get their detectron2 backbone's bottom-up part. Weights are random
    (``MODEL.PVT_D2.PRETRAINED`` is not fetched): sizes and speed do not depend on them.
    """
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone as d2_build_backbone

    import pvt_d2.modeling  # noqa: F401  (registers the builders)
    from pvt_d2.modeling.backbone.registry import build_pvt_d2_backbone

    cfg = _random_init(cfg)
    input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    if cfg.MODEL.BACKBONE.NAME.startswith("build_pvt_d2"):
        backbone = build_pvt_d2_backbone(cfg, input_shape)
    else:
        backbone = bottom_up_backbone(d2_build_backbone(cfg, input_shape))
    return backbone.to(device).eval()


def _random_init(cfg):
    """A copy of ``cfg`` whose backbone starts from random weights (no ImageNet checkpoint fetched)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.PVT_D2.PRETRAINED = ""
    return cfg


def build_detector(cfg, device: Optional[str] = None) -> nn.Module:
    """detectron2's ``build_model`` on ``device`` (default ``cfg.MODEL.DEVICE``), in eval mode; random weights
    unless ``MODEL.WEIGHTS`` names some (``MODEL.PVT_D2.PRETRAINED`` is not fetched)."""
    from detectron2.modeling import build_model

    import pvt_d2.modeling  # noqa: F401

    cfg = _random_init(cfg)
    if device is not None:
        cfg.MODEL.DEVICE = device
    return build_model(cfg).eval()


def _build_uninitialised(cfg) -> nn.Module:
    """The detector of ``cfg`` for counting only: built on the ``meta`` device (no memory, no weight init).

    A model whose constructor needs real tensor values (``.tolist()`` of a
    schedule computed with tensors) cannot be built there and is built
    normally on the CPU instead; the counts are the same either way.
    """
    from detectron2.modeling import META_ARCH_REGISTRY

    meta_arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    try:
        with torch.device("meta"):
            return meta_arch(cfg)
    except (NotImplementedError, RuntimeError):  # "Cannot copy out of meta tensor" and the like
        return meta_arch(cfg)


def detector_parameter_counts(cfg, backbone: Optional[nn.Module] = None) -> Dict[str, int]:
    """Parameters of a config's detector: ``{"backbone": n, "detector": n_total}``.

    The detector is built on the ``meta`` device, which allocates and
    initialises nothing, so counting even a large detector takes a fraction
    of a second. When ``backbone`` is given (built from ``cfg``, e.g. by
    :func:`build_backbone`, or shared by configs with the same
    ``MODEL.PVT_D2`` settings) its count is used for the backbone part. The
    sum equals the parameter count of ``build_model(cfg)`` (tested).
    """
    import pvt_d2.modeling  # noqa: F401  (registers the builders)

    model = _build_uninitialised(_cpu_cfg(cfg))
    n_model, n_bottom_up = count_parameters(model), count_parameters(bottom_up_backbone(model))
    n_backbone = n_bottom_up if backbone is None else count_parameters(backbone)
    return {"backbone": n_backbone, "detector": n_model - n_bottom_up + n_backbone}


def sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore FLOP rule for ``aten::scaled_dot_product_attention``.

    For queries ``(..., L, E)``, keys ``(..., S, E)`` and values ``(..., S, Ev)``:
    ``prod(...) * L * S * (E + Ev)`` multiply-adds (``Q K^T`` then ``A V``).
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    return int(batch * q[-2] * k[-2] * (q[-1] + v[-1]))


def flop_analysis(model: nn.Module, inputs):
    """A configured fvcore ``FlopCountAnalysis`` of ``model`` on ``inputs``, already counted.

    ``inputs``: a tensor / tuple of tensors (a backbone), or detectron2's list
    of dicts (a detector, traced through detectron2's ``TracingAdapter``).
    The returned object answers ``total()``, ``by_operator()``,
    ``by_module()`` and ``unsupported_ops()``; see fvcore.
    """
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], dict):
        from detectron2.utils.analysis import FlopCountAnalysis
    else:
        from fvcore.nn import FlopCountAnalysis
    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle(**{"aten::scaled_dot_product_attention": sdpa_flop_jit})
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        analysis.total()
    model.train(was_training)
    return analysis


def random_images(batch_size: int, height: int, width: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """A ``(B, 3, H, W)`` normal-noise batch, as a normalised image would look to a backbone."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, height, width, generator=g).to(device)


def detector_inputs(batch_size: int, height: int, width: int, device="cpu", seed: int = 0) -> List[Dict]:
    """detectron2 model inputs: ``B`` dicts with a random 0-255 ``image`` of exactly ``H x W``.

    The detector then runs at this size (detectron2 resizes in the data
    loader, not in the model).
    """
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (3, height, width), generator=g).float().to(device),
             "height": height, "width": width} for _ in range(batch_size)]


def _current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_free_heap() -> None:
    """Return the C allocator's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Freed tensors below glibc's mmap threshold stay resident in its heap;
    memory the measured block reuses from there would not raise the RSS, and
    its peak would go unseen (a 192 MiB tensor measured as 0 after a few
    hundred MB of 24 MB tensors were freed).
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _maxrss_bytes() -> int:
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB


#: Name of :class:`PeakMemory`'s RSS sampling thread.
SAMPLER_THREAD_NAME = "pvt_d2-peak-memory"


class PeakMemory:
    """Context manager measuring the peak memory increase of the code it wraps.

    After the block: ``baseline_bytes`` (memory in use before) and
    ``peak_bytes`` (highest increase over it during the block).

    Args:
        device: ``"cpu"`` or a CUDA device.
        interval_s: RSS sampling period on the CPU.
        release_free_heap: on the CPU, first return the C allocator's free
            memory to the OS (see :func:`_release_free_heap`), so that memory
            the block reuses from it is counted.
    """

    def __init__(self, device="cpu", interval_s: float = 0.002, release_free_heap: bool = True):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.release_free_heap = release_free_heap
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._sampled_peak = 0
        self._thread = None

    def sample(self) -> None:
        """Record the memory in use now (CPU); the background thread calls it every ``interval_s``.

        Call it where the code knows its memory is high: a block shorter than
        the thread's scheduling delay (a loaded machine) is otherwise missed.
        """
        if self.device.type == "cuda":
            return  # the CUDA allocator keeps its own peak
        rss = _current_rss_bytes()
        if rss is not None and rss > self._sampled_peak:
            self._sampled_peak = rss

    def _sample_until_stopped(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            if self.release_free_heap:
                _release_free_heap()  # the baseline counts only memory in use, so reused free memory shows up
            self.baseline_bytes = _current_rss_bytes() or _maxrss_bytes()
            self._maxrss_before = _maxrss_bytes()
            self._sampled_peak = self.baseline_bytes
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample_until_stopped, name=SAMPLER_THREAD_NAME, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = self._sampled_peak
            maxrss_after = _maxrss_bytes()
            if maxrss_after > self._maxrss_before:  # the process's all-time peak was reached in the block
                peak = max(peak, maxrss_after)
        self.peak_bytes = max(0, peak - self.baseline_bytes)
        return False


def autocast_dtype(device) -> torch.dtype:
    """The mixed-precision dtype of :func:`autocast` on ``device``: float16 on CUDA, bfloat16 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


def autocast(device, enabled: bool):
    """Mixed precision for ``device`` (:func:`autocast_dtype`); a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype(device))


@dataclass
class BenchmarkResult:
    """Timings (seconds per iteration) and peak memory of one benchmark.

    ``precision`` names the arithmetic timed (``"float32"``, ``"bfloat16 autocast"``, ...).
    """

    name: str
    device: str
    amp: bool
    batch_size: int
    height: int
    width: int
    times_s: List[float] = field(default_factory=list)
    peak_memory_bytes: int = 0
    baseline_memory_bytes: int = 0
    precision: str = "float32"

    @property
    def mean_ms(self) -> float:
        return 1000 * statistics.fmean(self.times_s)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times_s)

    @property
    def min_ms(self) -> float:
        return 1000 * min(self.times_s)

    @property
    def throughput(self) -> float:
        """Images per second (batch size / mean iteration time)."""
        return self.batch_size / statistics.fmean(self.times_s)

    def as_dict(self) -> Dict:
        d = asdict(self)
        d.update(mean_ms=self.mean_ms, median_ms=self.median_ms, min_ms=self.min_ms,
                 images_per_s=self.throughput, peak_memory_mib=self.peak_memory_bytes / 2 ** 20)
        return d

    def summary(self) -> str:
        return (f"{self.name}: {self.mean_ms:.1f} ms/iter (median {self.median_ms:.1f}, min {self.min_ms:.1f}), "
                f"{self.throughput:.2f} img/s, peak memory +{self.peak_memory_bytes / 2 ** 20:.0f} MiB "
                f"[{self.device}, {self.precision}, batch {self.batch_size}, "
                f"{self.width}x{self.height}]")


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_benchmark(fn: Callable[[], object], *, name: str, device="cpu", iters: int = 10, warmup: int = 2,
                  amp: bool = False, batch_size: int = 1, size: Sequence[int] = (0, 0),
                  max_seconds: Optional[float] = None, measure_memory: bool = True,
                  precision: Optional[str] = None) -> BenchmarkResult:
    """Time ``fn()`` (one forward pass) ``iters`` times after ``warmup`` untimed calls.

    Runs under ``torch.no_grad()`` and :func:`autocast`. The peak memory is
    measured on one more, untimed pass (``measure_memory``): on the CPU its
    RSS sampling thread would compete with the compute threads for the cores
    (6-12% slower passes at two threads on two cores), so no timed pass runs
    beside it. ``size`` is ``(height, width)`` and only recorded. With
    ``max_seconds``, timing stops early once the timed iterations took that
    long in total (at least one iteration is timed). ``precision`` labels the
    arithmetic when ``fn`` sets its own autocast (default: from ``amp``).
    """
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    device = torch.device(device)
    if precision is None:
        precision = str(autocast_dtype(device)).replace("torch.", "") + " autocast" if amp else "float32"
    result = BenchmarkResult(name, str(device), amp, batch_size, int(size[0]), int(size[1]), precision=precision)
    with torch.no_grad(), autocast(device, amp):
        for _ in range(max(0, warmup)):
            fn()
        _sync(device)
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            _sync(device)
            result.times_s.append(time.perf_counter() - start)
            if max_seconds is not None and sum(result.times_s) >= max_seconds:
                break
        if measure_memory:
            with PeakMemory(device) as mem:
                fn()
                mem.sample()
            result.peak_memory_bytes = mem.peak_bytes
            result.baseline_memory_bytes = mem.baseline_bytes
    return result
