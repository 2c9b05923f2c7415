"""Setup phase: how fast keep-all and the smallest allowed model run, the target, the proxy.

Measured once, by rank 0, and stored in the run folder (``state/setup``) so that a resumed run
reuses it instead of measuring again (docs/DESIGN.md, "Run phases").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hawada.core.calibrate import calibration_logits, measure_subarchs
from hawada.core.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from hawada.core.export import ExportPolicy, compute_dtype, export
from hawada.core.gates import GateStore
from hawada.core.loop import Progress
from hawada.core.profiler import Meter, measure_pooled, relative_meter
from hawada.core.proxy_cost import LatencyProxy
from hawada.errors import InputError
from hawada.run.context import RunContext
from hawada.run.folder import RunPaths

CALIB_WARN_PCT = 10.0  # a calibration that misses by more is said in one line


class TargetError(InputError):
    """A latency target that no allowed keep set can reach."""


@dataclass
class Setup:
    """The setup measurements (ms on the run's device) and the calibrated proxy's state.

    ``tensors`` holds the proxy's buffers (``proxy.*``) and the calibration points' widths
    (``calib.{i}``, ``[S]`` each, with ``calib_ms[i]``).
    """

    base_ms: float
    min_ms: float
    target_ms: float
    initial_fit_mape: float
    keepall_error: float  # (proxy of keep-all - measured keep-all) / measured, after calibration
    calib_ms: list[float]
    proxy_calibration: list[dict]
    proxy_table_measured: bool
    tensors: dict[str, torch.Tensor]

    def state(self) -> dict:
        """The JSON part (the setup checkpoint's header)."""
        d = asdict(self)
        d.pop("tensors")
        return d


def minimal_keep_logits(store: GateStore) -> torch.Tensor:
    """``[N]`` logits with which each segment keeps exactly its ``min_keep`` gates (the fastest allowed).

    A model needs one transformer layer (an export without any is refused): when no layer gate
    must stay open, the first one does."""
    new = torch.full_like(store.logits.detach(), -1.0)
    for s in store.segments:
        new[s.start : s.start + s.min_keep] = 1.0
    layers = [s for s in store.segments if s.kind == "layer"]
    if layers and not any(s.min_keep for s in layers):
        new[layers[0].start] = 1.0
    return new


def new_proxy(ctx: RunContext) -> LatencyProxy:
    """An uncalibrated proxy over the student's gates, at the shape the run times."""
    terms = ctx.adapter.cost_terms(ctx.student, ctx.job.latency_inputs)
    return LatencyProxy(ctx.store, terms, mode=ctx.recipe.proxy.mode).to(ctx.device)


POOLED_ROUNDS = 3  # keep-all and the smallest model, interleaved: as in the final report


def progress_bar(ctx: RunContext, desc: str, total: int | None) -> Progress:
    """A bar on rank 0 when the recipe's ``progress`` is on (docs/DESIGN.md, "Run phases")."""
    return Progress(ctx.recipe.progress, total, desc, env=ctx.env)


def _setup_tensors(proxy: LatencyProxy, calib: list) -> dict[str, torch.Tensor]:
    t = {f"proxy.{k}": v.detach().cpu() for k, v in proxy.state_dict().items()}
    for i, (w, _) in enumerate(calib):
        t[f"calib.{i}"] = torch.as_tensor(w)
    return t


def measure_setup(ctx: RunContext) -> Setup:
    """Time keep-all and the smallest allowed model, set the target, build and calibrate the proxy,
    and store all of it in the run folder (with a teacher the run trained)."""
    recipe, store = ctx.recipe, ctx.store
    # the target is a fraction of this keep-all median: one discarded measurement takes the first
    # timings of the process (allocations, thread pool start), then both are measured interleaved
    # and pooled, as in the final report
    with store.logits_as(minimal_keep_logits(store)):
        minimal = export(ctx.student, ExportPolicy(check=False))
    # one discarded call, then both models in every round
    with progress_bar(ctx, "setup: keep-all / smallest", 1 + 2 * POOLED_ROUNDS) as bar:
        meter: Meter = bar.counting(ctx.meter)
        meter(ctx.teacher)
        base_r, min_r = measure_pooled([ctx.teacher, minimal], meter, rounds=POOLED_ROUNDS)
    base_ms, min_ms = base_r.median_ms, min_r.median_ms
    del minimal
    t = recipe.target
    target_ms = t.latency_ms if t.latency_ms is not None else t.ratio * base_ms
    if target_ms < min_ms:
        raise TargetError(
            f"target latency {target_ms:.3g} ms is below the fastest allowed keep set ({min_ms:.3g} ms measured "
            f"on {ctx.dev} with every segment at its min_keep; keep-all {base_ms:.3g} ms)"
        )
    ctx.log(
        f"latency on {ctx.dev}: keep-all {base_ms:.2f} ms, smallest allowed {min_ms:.2f} ms, "
        f"target {target_ms:.2f} ms"
    )

    # proxy: lookup table + calibration on several measured sub-architectures
    proxy = new_proxy(ctx)
    p = recipe.proxy
    if p.mode == "lut":
        with progress_bar(ctx, "setup: lookup table", None) as bar:
            n_ops = proxy.measure_table(
                device=ctx.dev,
                repeats=p.lut_repeats,
                budget_s=p.lut_budget_s,
                progress=bar.step,
                dtype=compute_dtype(ctx.student),
            )
        ctx.log(f"proxy lookup table: {n_ops} ops timed")
    with progress_bar(ctx, "setup: calibration", p.calib_points) as bar:
        # each point timed next to keep-all and put on the scale of base_ms (a drift of the
        # machine's speed between two points would otherwise be fitted as a cost of width)
        calib = measure_subarchs(
            ctx.student,
            calibration_logits(ctx.student, p.calib_points, recipe.seed),
            relative_meter(ctx.meter, ctx.teacher, base_ms),
            bar.step,
        )
    fit = proxy.calibrate([w for w, _ in calib], [m for _, m in calib])
    with torch.no_grad():
        keepall_error = (float(proxy(store.seg_units)) - base_ms) / base_ms
    ctx.log(
        f"proxy calibrated on {len(calib)} measured sub-architectures: MAPE {fit['mape']:.1f}%, "
        f"keep-all {100 * keepall_error:+.1f}%"
    )
    if fit["mape"] > CALIB_WARN_PCT or abs(keepall_error) * 100 > CALIB_WARN_PCT:
        ctx.log(
            f"warning: the latency proxy misses the measured sub-architectures by more than {CALIB_WARN_PCT:g}% "
            "(gate training aims at a proxy number; its probes recalibrate it on the way)"
        )
    setup = Setup(
        base_ms=base_ms,
        min_ms=min_ms,
        target_ms=target_ms,
        initial_fit_mape=fit["mape"],
        keepall_error=keepall_error,
        calib_ms=[float(m) for _, m in calib],
        proxy_calibration=proxy.calibration,
        proxy_table_measured=bool(proxy.table_measured),
        tensors=_setup_tensors(proxy, calib),
    )
    stored = dict(setup.tensors)
    if recipe.model.path is None:  # a teacher trained (or built) by the run: a resume reuses it
        stored.update({f"teacher.{k}": v for k, v in ctx.teacher.state_dict().items()})
    save_checkpoint(ctx.paths.setup, 0, stored, setup.state())
    return setup


def load_setup(paths: RunPaths) -> tuple[Setup, dict[str, torch.Tensor] | None] | None:
    """The setup a first start stored, and the teacher it trained (None when it loaded one); None
    when no setup was stored."""
    if not has_checkpoint(paths.setup):
        return None
    tensors, state, _ = load_checkpoint(paths.setup)
    teacher = {k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")} or None
    own = {k: v for k, v in tensors.items() if not k.startswith("teacher.")}
    return Setup(**state, tensors=own), teacher


def calibrated_proxy(ctx: RunContext, setup: Setup) -> tuple[LatencyProxy, list]:
    """The proxy and calibration points ``(widths [S], ms)`` of a setup (measured once, by rank 0)."""
    px = new_proxy(ctx)
    st = setup.tensors
    px.load_state_dict({k[6:]: v for k, v in st.items() if k.startswith("proxy.")}, strict=True)
    px.calibration = setup.proxy_calibration
    px.table_measured = setup.proxy_table_measured
    return px, [(st[f"calib.{i}"], ms) for i, ms in enumerate(setup.calib_ms)]
