"""Real latency on the target device, with the settings that produced it (invariant 6)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import platform
import statistics
import time
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from hawada import _ext
from hawada.core.loop import to_device
from hawada.core.schema import check_fields, knob
from hawada.errors import InputError

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]
Timer = Literal["python", "auto", "cpp"]
TIMERS = typing.get_args(Timer)
# The deployment runtimes a run can be timed in (hawada.runtimes registers one of each).
RuntimeName = Literal["eager", "int8_dynamic", "onnxruntime", "onnxruntime_int8", "compile"]
INT8_RUNTIMES = ("int8_dynamic", "onnxruntime_int8")


@dataclass
class MeasureConfig:
    """How one latency is measured: the recipe's ``measure`` section and the defaults of
    :func:`measure_latency_ms` (see its docstring for each field)."""

    warmup: int = knob(3, lo=0)
    min_repeats: int = knob(10, lo=1)
    max_repeats: int = knob(200, lo=1)
    budget_s: float = knob(3.0, lo=0.0, lo_open=True)
    rel_ci: float = knob(0.02, lo=0.0, help="stop once the 95% interval of the median is within this")
    timer: Timer = knob(
        "python",
        help="python: the eager model as users run it; cpp/auto: the compiled extension's loop over a "
        "traced program (less Python overhead, so not what an eager user sees)",
    )
    cuda_graph: bool = knob(False, help="CUDA: time CUDA-graph replays")
    flush_l2: bool = knob(False, help="CUDA: overwrite the L2 cache before each timed call")
    runtime: RuntimeName = knob(
        "eager",
        help="the runtime every latency of the run is measured in (the one you deploy): eager PyTorch, "
        "int8_dynamic (torch dynamic int8 Linears, CPU), onnxruntime / onnxruntime_int8 (CPU, extra "
        "hawada[onnx], timed in worker processes) or compile (torch.compile, inductor)",
    )

    def __post_init__(self) -> None:
        check_fields(self, "measure")


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
    runtime: str = "eager"  # what was timed: the plain model (eager) or its deployed form

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
    config: MeasureConfig | None = None,
    **overrides: Any,
) -> LatencyResult:
    """Time one forward of ``model(example_inputs)`` on ``device``.

    The settings are ``config`` (default :class:`MeasureConfig`) with ``overrides`` (its field
    names, e.g. ``min_repeats=5``) applied.

    Runs ``warmup`` untimed calls, then timed calls until the 95% interval of the median is
    within ``rel_ci`` of it (after ``min_repeats``), ``max_repeats`` are done, or
    ``budget_s`` seconds have been spent. CPU uses a monotonic clock; CUDA uses an event pair
    per call (or per CUDA-graph replay when ``cuda_graph``). Works for models without a
    ``.device`` attribute; inputs are moved to ``device``. Raises when the model's weights
    are on another device than the one asked for.

    ``timer``: ``auto`` uses the compiled extension's loop when it can (CPU: a traced
    TorchScript program called from C++ with the GIL released, steady clock; CUDA with
    ``cuda_graph``: graph replays with an event pair each, enqueued from C++) and the Python
    loop otherwise; ``cpp`` requires the C++ loop (ValueError when it cannot be used);
    ``python`` never uses it. ``flush_l2`` (CUDA): overwrite a buffer twice the L2 size before
    each timed call, outside the timed region. ``LatencyResult.timer`` names the timer used:
    ``perf_counter``, ``cuda_event``, ``cuda_graph``, ``cpp_steady_clock``, ``cpp_cuda_graph``.
    """
    timer = overrides.get("timer", (config or MeasureConfig()).timer)
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    cfg = dataclasses.replace(config or MeasureConfig(), **overrides)
    warmup, cuda_graph, flush_l2 = cfg.warmup, cfg.cuda_graph, cfg.flush_l2
    mdev = module_device(model) if isinstance(model, nn.Module) else None
    dev = torch.device(device) if device is not None else (mdev or torch.device("cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if mdev is not None and mdev.type != dev.type:
        raise ValueError(f"model weights are on {mdev} but latency was asked for on {dev}")
    inputs = to_device(example_inputs, dev, non_blocking=False)
    shapes, dtype = _describe(inputs)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    call = make_call(model, inputs)
    flush_buf = None
    if flush_l2 and dev.type == "cuda":
        l2 = int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or 0)
        flush_buf = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device=dev)
    stop = (cfg.warmup, cfg.min_repeats, cfg.max_repeats, cfg.budget_s, cfg.rel_ci)
    try:
        samples, used = [], ""
        if timer != "python":
            samples, used = _cpp_samples(model, inputs, dev, timer == "cpp", cuda_graph, flush_buf, stop)
        if not samples:
            samples, used = _python_samples(call, dev, cuda_graph, flush_buf, stop)
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
        timer=used,
        threads=torch.get_num_threads(),
        samples_ms=samples,
    )


def _python_samples(
    call: Callable[[], Any],
    dev: torch.device,
    cuda_graph: bool,
    flush_buf: torch.Tensor | None,
    stop: tuple[int, int, int, float, float],
) -> tuple[list[float], str]:
    """The Python timing loop: ``(samples in ms, timer name)``."""
    warmup, min_repeats, max_repeats, budget_s, rel_ci = stop
    timer = "perf_counter"
    samples: list[float] = []
    events: list[Any] = []  # one start/end pair, reused: each sample waits for its end event
    with torch.inference_mode(), contextlib.ExitStack() as owned:
        for _ in range(max(warmup, 1 if cuda_graph else 0)):
            call()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            if cuda_graph:
                call = owned.enter_context(_captured(call)).replay
                timer = "cuda_graph"
            else:
                timer = "cuda_event"
            events += [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            owned.callback(events.clear)  # freed on the way out, not kept alive by a traceback
        t_start = time.perf_counter()
        while len(samples) < max_repeats:
            if dev.type == "cuda":
                if flush_buf is not None:
                    flush_buf.zero_()
                events[0].record()
                call()
                events[1].record()
                events[1].synchronize()
                samples.append(events[0].elapsed_time(events[1]))
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
    return samples, timer


def _cpp_samples(
    model: Any,
    inputs: Any,
    dev: torch.device,
    required: bool,
    cuda_graph: bool,
    flush_buf: torch.Tensor | None,
    stop: tuple[int, int, int, float, float],
) -> tuple[list[float], str]:
    """The extension's timing loops: ``(samples in ms, timer name)``, or ``([], "")`` when they
    cannot be used (with ``required``: ValueError naming why)."""
    if dev.type == "cpu":
        prog = _cpp_cpu_program(model, inputs, required)
        if prog is None:
            return [], ""
        script, args = prog
        ext = _ext.load()
        return adaptive_samples(
            lambda n, w: ext.time_script_cpu(script, args, n, w), *stop
        ), "cpp_steady_clock"
    if not (dev.type == "cuda" and cuda_graph and _ext.has_cuda()):
        if required:
            raise InputError(
                f"timer='cpp' on {dev.type} needs a CPU device, or CUDA with cuda_graph=True and hawada._C "
                f"built with CUDA (extension loaded: {_ext.available()}, with CUDA: {_ext.has_cuda()})"
            )
        return [], ""
    ext = _ext.load()
    call = make_call(model, inputs)
    warmup, *rest = stop
    with torch.inference_mode():
        for _ in range(max(warmup, 1)):
            call()
        torch.cuda.synchronize(dev)
        nbytes = 0 if flush_buf is None else flush_buf.numel()
        with _captured(call) as graph:
            samples = adaptive_samples(lambda n, w: ext.time_cuda_graph(graph, n, nbytes), 0, *rest)
    return samples, "cpp_cuda_graph"


@contextlib.contextmanager
def _captured(call: Callable[[], Any]) -> Iterator[Any]:
    """A ``torch.cuda.CUDAGraph`` of one ``call()``, reset on every way out of the block.

    Reset frees the graph's executable and returns its private memory pool; without it a failed
    measurement would keep both for as long as its traceback (which holds this frame) lives.
    """
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call()
        yield graph
    finally:
        graph.reset()


def adaptive_samples(
    run: Callable[[int, int], list[float]],
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    budget_s: float,
    rel_ci: float,
) -> list[float]:
    """The stopping rule every timing loop shares: samples from ``run(n, warmup) -> n samples
    (ms)`` in chunks, until the 95% interval of the median is within ``rel_ci`` of it, or
    ``max_repeats`` samples, or ``budget_s`` seconds; chunks keep Python out of the timed region
    and stay short enough to honour the budget."""
    t_start = time.perf_counter()
    samples = list(run(max(1, min(min_repeats, max_repeats)), warmup))
    while len(samples) < max_repeats:
        st = summarize_samples(samples)
        if st["ci95_ms"] <= rel_ci * st["median_ms"]:
            break
        left_s = budget_s - (time.perf_counter() - t_start)
        if left_s <= 0:
            break
        per_ms = max(st["median_ms"], 1e-6)
        chunk = int(min(max_repeats - len(samples), max(len(samples) // 2, 1), left_s * 1e3 / per_ms))
        samples.extend(run(max(chunk, 1), 0))
    return samples


def _cpp_cpu_program(model: Any, inputs: Any, required: bool) -> tuple[Any, list[torch.Tensor]] | None:
    """``(TorchScript module, positional tensor inputs)`` for the C++ CPU loop, or None (with
    ``required``: ValueError) when the extension is missing or the call cannot be traced."""

    def fail(why: str) -> None:
        if required:
            raise InputError(f"timer='cpp' cannot be used: {why}")
        return None

    mod = _ext.load()
    if mod is None:
        return fail("the extension hawada._C is not loaded")
    if isinstance(inputs, Mapping):
        keys, args = list(inputs), list(inputs.values())
    elif isinstance(inputs, list | tuple):
        keys, args = None, list(inputs)
    else:
        keys, args = None, [inputs]
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        return fail("inputs must be tensors (a tensor, a tuple/list or a dict of tensors)")
    if isinstance(model, torch.jit.ScriptModule) and keys is None:
        return model, args
    if not isinstance(model, nn.Module):
        return fail(f"{type(model).__name__} is not an nn.Module")
    target = _KwargsCall(model, keys) if keys is not None else model
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # deprecation and tracer warnings: timing only needs the ops
            script = torch.jit.trace(target, tuple(args), check_trace=False, strict=False)
        # The program must compute what the eager call computes (a call that keeps Python state,
        # e.g. a growing KV cache, or that branches on data, does not): otherwise the Python loop.
        with torch.no_grad():
            same = _same_outputs(script(*args), target(*args))
    except Exception as e:  # untraceable models are timed by the Python loop
        return fail(f"tracing failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not same:
        return fail("the traced program's outputs differ from the eager call's")
    return script, args


def _flat_tensors(x: Any) -> list | None:
    """Tensors of a nested output (tensor, list/tuple, dict); None for anything else."""
    if isinstance(x, torch.Tensor):
        return [x]
    items = x.values() if isinstance(x, Mapping) else x if isinstance(x, list | tuple) else None
    if items is None:
        return None if x is not None else []
    out: list = []
    for v in items:
        f = _flat_tensors(v)
        if f is None:
            return None
        out += f
    return out


def _same_outputs(a: Any, b: Any) -> bool:
    fa, fb = _flat_tensors(a), _flat_tensors(b)
    if fa is None or fb is None or len(fa) != len(fb):
        return False
    for x, y in zip(fa, fb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point() or x.is_complex():
            if not torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True):
                return False
        elif not torch.equal(x, y):
            return False
    return True


class _KwargsCall(nn.Module):
    """``forward(*values)`` calls ``model(**dict(zip(keys, values)))`` so that a kwargs model traces."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *values: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.keys, values)))


Meter = Callable[[nn.Module], LatencyResult]


def latency_meter(
    example_inputs: Inputs,
    device: str | torch.device,
    wrap: Callable[[nn.Module], Any] | None = None,
    config: MeasureConfig | None = None,
    **overrides: Any,
) -> Meter:
    """``meter(model) -> LatencyResult``: one way of timing a plain model, used everywhere a run
    measures (keep-all, calibration, probes, search, report). ``wrap(model)`` turns the model
    into what is timed (e.g. one decode step with a KV cache); default: the model itself."""

    def meter(model: nn.Module) -> LatencyResult:
        return measure_latency_ms(wrap(model) if wrap else model, example_inputs, device, config, **overrides)

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


def measure_pooled(models: list[nn.Module], meter: Meter, rounds: int = 3) -> list[LatencyResult]:
    """Measure several models in the same run, interleaved A B .. A B .., pooling each one's
    samples over ``rounds`` (load that comes and goes lands on all of them alike)."""
    runs: list[list[LatencyResult]] = [[] for _ in models]
    for _ in range(rounds):
        for rs, m in zip(runs, models):
            rs.append(meter(m))

    def pooled(rs: list[LatencyResult]) -> LatencyResult:
        xs = [x for r in rs for x in r.samples_ms]
        r = rs[-1]
        return LatencyResult(
            **summarize_samples(xs),
            n=len(xs),
            device=r.device,
            dtype=r.dtype,
            shapes=r.shapes,
            warmup=r.warmup,
            timer=r.timer,
            threads=r.threads,
            samples_ms=xs,
            runtime=r.runtime,
        )

    return [pooled(rs) for rs in runs]


def scaled_result(r: LatencyResult, scale: float) -> LatencyResult:
    """``r`` with every time multiplied by ``scale`` (counts and provenance unchanged)."""
    times = ("median_ms", "p20_ms", "p80_ms", "mean_ms", "std_ms", "min_ms", "ci95_ms")
    return dataclasses.replace(
        r, **{k: getattr(r, k) * scale for k in times}, samples_ms=[x * scale for x in r.samples_ms]
    )


def relative_meter(meter: Meter, reference: nn.Module, reference_ms: float, rounds: int = 1) -> Meter:
    """A meter whose result is ``reference_ms x (model / reference)``, the two timed interleaved.

    Absolute times on a shared machine drift by several percent from one minute to the next,
    while the ratio of two models timed side by side does not: every point the proxy is fitted
    on (calibration, probes) is therefore put on the scale of one keep-all measurement, so the
    proxy of keep-all is that measurement and the proxy's other numbers are ratios to it, the
    quantity the target and the final report are stated in.
    """

    def meter_rel(model: nn.Module) -> LatencyResult:
        ref_r, r = measure_pooled([reference, model], meter, rounds=rounds)
        return scaled_result(r, reference_ms / ref_r.median_ms)

    return meter_rel


def ratio_ci(
    num: LatencyResult,
    den: LatencyResult | float,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap interval of ``median(num) / median(den)`` (e.g. a speedup: keep-all over slim).

    Each side's samples are resampled with replacement (a fixed seed: the same samples give the
    same interval); returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles. ``den``
    may be a fixed number (e.g. an absolute latency target): then only ``num`` varies.
    """
    a = torch.tensor(num.samples_ms, dtype=torch.float64)
    den_ms = [float(den)] if isinstance(den, int | float) else den.samples_ms
    b = torch.tensor(den_ms, dtype=torch.float64)
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError("ratio_ci needs the samples of both measurements")
    g = torch.Generator().manual_seed(seed)
    ia = torch.randint(0, a.numel(), (resamples, a.numel()), generator=g)
    ib = torch.randint(0, b.numel(), (resamples, b.numel()), generator=g)
    ratios = a[ia].median(dim=1).values / b[ib].median(dim=1).values
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(ratios, q).tolist()
    return lo, hi
