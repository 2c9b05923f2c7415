"""Real latency on the target device, with the settings that produced it (invariant 6)."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]


@dataclass
class LatencyResult:
    """One latency measurement: robust statistics plus how it was taken.

    ``ci95_ms`` is the half-width of a distribution-free 95% interval of the median.
    """

    median_ms: float
    p20_ms: float
    p80_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    ci95_ms: float
    n: int
    device: str
    dtype: str
    shapes: list
    warmup: int
    timer: str
    threads: int
    samples_ms: list[float] = field(repr=False, default_factory=list)

    def __float__(self) -> float:
        return self.median_ms

    @property
    def spread_ms(self) -> float:
        """p80 - p20."""
        return self.p80_ms - self.p20_ms

    def to_dict(self, samples: bool = False) -> dict:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        d["spread_ms"] = self.spread_ms
        return d


def summarize_samples(samples_ms: Sequence[float]) -> dict[str, float]:
    """Median, p20, p80, mean, std, min and the 95% CI half-width of the median."""
    xs = sorted(samples_ms)
    n = len(xs)
    if n == 0:
        raise ValueError("no latency samples")

    def q(p: float) -> float:
        pos = p * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    # Order-statistic interval for the median: ranks n/2 -+ 1.96 sqrt(n)/2.
    half = 1.96 * math.sqrt(n) / 2
    lo_i = max(0, math.floor(n / 2 - half))
    hi_i = min(n - 1, math.ceil(n / 2 + half))
    return {
        "median_ms": q(0.5),
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "mean_ms": statistics.fmean(xs),
        "std_ms": statistics.pstdev(xs) if n > 1 else 0.0,
        "min_ms": xs[0],
        "ci95_ms": (xs[hi_i] - xs[lo_i]) / 2,
    }


def module_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer; None when it has neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to(v, device) for v in x)
    return x


def _describe(x: Any) -> tuple[list, str]:
    shapes, dtypes = [], set()
    items = x.values() if isinstance(x, Mapping) else (x if isinstance(x, list | tuple) else [x])
    for v in items:
        if isinstance(v, torch.Tensor):
            shapes.append(list(v.shape))
            dtypes.add(str(v.dtype).replace("torch.", ""))
    return shapes, ",".join(sorted(dtypes))


def make_call(model: Callable, inputs: Inputs) -> Callable[[], Any]:
    """A no-argument closure that runs ``model`` on ``inputs`` (tensor, tuple or kwargs dict)."""
    if isinstance(inputs, Mapping):
        return lambda: model(**inputs)
    if isinstance(inputs, list | tuple):
        return lambda: model(*inputs)
    return lambda: model(inputs)


def measure_latency_ms(
    model: nn.Module | Callable,
    example_inputs: Inputs,
    device: str | torch.device | None = None,
    warmup: int = 3,
    min_repeats: int = 7,
    max_repeats: int = 200,
    budget_s: float = 3.0,
    rel_ci: float = 0.02,
    cuda_graph: bool = False,
) -> LatencyResult:
    """Time one forward of ``model(example_inputs)`` on ``device``.

    Runs ``warmup`` untimed calls, then timed calls until the 95% interval of the median is
    within ``rel_ci`` of it (after ``min_repeats``), ``max_repeats`` are done, or
    ``budget_s`` seconds have been spent. CPU uses a monotonic clock; CUDA uses an event pair
    per call (or per CUDA-graph replay when ``cuda_graph``). Works for models without a
    ``.device`` attribute; inputs are moved to ``device``. Raises when the model's weights
    are on another device than the one asked for.
    """
    mdev = module_device(model) if isinstance(model, nn.Module) else None
    dev = torch.device(device) if device is not None else (mdev or torch.device("cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if mdev is not None and mdev.type != dev.type:
        raise ValueError(f"model weights are on {mdev} but latency was asked for on {dev}")
    inputs = _to(example_inputs, dev)
    shapes, dtype = _describe(inputs)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    call = make_call(model, inputs)
    timer = "perf_counter"
    samples: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(max(warmup, 1 if cuda_graph else 0)):
                call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                if cuda_graph:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        call()
                    call = graph.replay
                    timer = "cuda_graph"
                else:
                    timer = "cuda_event"
            t_start = time.perf_counter()
            while len(samples) < max_repeats:
                if dev.type == "cuda":
                    a = torch.cuda.Event(enable_timing=True)
                    b = torch.cuda.Event(enable_timing=True)
                    a.record()
                    call()
                    b.record()
                    b.synchronize()
                    samples.append(a.elapsed_time(b))
                else:
                    t0 = time.perf_counter()
                    call()
                    samples.append((time.perf_counter() - t0) * 1e3)
                n = len(samples)
                if n >= min_repeats:
                    st = summarize_samples(samples)
                    if st["ci95_ms"] <= rel_ci * st["median_ms"]:
                        break
                    if time.perf_counter() - t_start > budget_s:
                        break
    finally:
        if was_training:
            model.train()
    st = summarize_samples(samples)
    return LatencyResult(
        **st,
        n=len(samples),
        device=str(dev),
        dtype=dtype,
        shapes=shapes,
        warmup=warmup,
        timer=timer,
        threads=torch.get_num_threads(),
        samples_ms=samples,
    )


Meter = Callable[[nn.Module], LatencyResult]


def latency_meter(
    example_inputs: Inputs,
    device: str | torch.device,
    wrap: Callable[[nn.Module], Any] | None = None,
    **measure_kw: Any,
) -> Meter:
    """``meter(model) -> LatencyResult``: one way of timing a plain model, used everywhere a run
    measures (keep-all, calibration, probes, search, report). ``wrap(model)`` turns the model
    into what is timed (e.g. one decode step with a KV cache); default: the model itself."""

    def meter(model: nn.Module) -> LatencyResult:
        return measure_latency_ms(wrap(model) if wrap else model, example_inputs, device=device, **measure_kw)

    return meter


def environment_info() -> dict:
    """Device and library versions, attached to every latency report and benchmark result."""
    v = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    for mod in ("torchvision", "transformers", "triton"):
        with contextlib.suppress(Exception):  # an optional library may be missing or broken
            v[mod] = importlib.import_module(mod).__version__
    if torch.cuda.is_available():
        v["gpu"] = torch.cuda.get_device_name()
    return v
