"""Gate phase: train gates and weights against the teacher under the latency target."""

from __future__ import annotations

import copy
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hawada.core.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from hawada.core.distributed import fully_shard_layers, main_only, on_main
from hawada.core.export import ExportPolicy, export
from hawada.core.profiler import measure_pooled, relative_meter
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.train import LagrangeTrainer, StopRequested, make_latency_probe
from hawada.errors import InputError
from hawada.run.context import RunContext, seed_everything
from hawada.run.folder import MetricsLog, NoLog, open_metrics
from hawada.run.setup import Setup


class RunInterrupted(Exception):
    """SIGINT/SIGTERM during gate training: the step finished, a checkpoint was written."""

    def __init__(self, signum: int, step: int, run_dir: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after gate step {step}, checkpoint written; "
            f"continue with: hawada optimize --resume {run_dir}"
        )
        self.signum = signum


class SignalFlag:
    """SIGINT/SIGTERM set a flag (the current step finishes) instead of killing the step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict = {}

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


@dataclass
class GatePhase:
    """The trained gates: ``student`` is the plain (unsharded) gated student, in eval mode;
    ``landing`` is its eval-mode keep set measured against the target (:func:`measure_landing`)."""

    student: nn.Module
    trainer: LagrangeTrainer
    history: list[dict]
    metrics: MetricsLog | NoLog
    landing: dict


def measure_landing(ctx: RunContext, student: nn.Module, setup: Setup) -> dict:
    """Where gate training landed: the export of the eval-mode keep set, timed interleaved with
    keep-all, against the target (a ratio target: that ratio of the keep-all timed next to it)."""
    slim = export(student, ExportPolicy(check=False))
    base_r, slim_r = measure_pooled([ctx.teacher, slim], ctx.meter, rounds=2)
    ratio = ctx.recipe.target.ratio if ctx.recipe.target.latency_ms is None else None
    target = ratio * base_r.median_ms if ratio is not None else setup.target_ms
    kept = int(round(float(ctx.store.open_units().sum())))
    return {
        "target_ms": target,
        "measured_ms": slim_r.median_ms,
        "base_ms": base_r.median_ms,
        "error": (slim_r.median_ms - target) / target,
        "units": kept,
        "units_total": int(ctx.store.seg_units.sum()),
    }


def _sharded(ctx: RunContext) -> tuple[nn.Module, Callable[[], nn.Module]]:
    """FSDP2: shard the student's and the distillation teacher's layers over the ranks.

    An unsharded copy of the gated student (in host memory) is what probes, the search and the
    export see, loaded with the whole weights when needed (``materialize``, a collective).
    Returns ``(distillation teacher, materialize)``.
    """
    from hawada.core.distributed import full_state_dict

    if ctx.recipe.train.amp == "fp16":
        raise InputError("distributed.strategy fsdp does not support train.amp fp16; use bf16")
    template = copy.deepcopy(ctx.student).cpu()
    kd_teacher = copy.deepcopy(ctx.teacher)
    fully_shard_layers(kd_teacher, ctx.adapter.shard_units(kd_teacher), ctx.env)
    fully_shard_layers(ctx.student, ctx.adapter.shard_units(ctx.student), ctx.env)
    if ctx.device.type != "cpu":
        ctx.teacher.cpu()  # the plain teacher waits in host memory until the fine-tune

    def materialize() -> nn.Module:
        sd = full_state_dict(ctx.student)  # collective: every rank gets the whole tensors
        template.load_state_dict({k: v.cpu() for k, v in sd.items()}, strict=True)
        return template

    return kd_teacher, materialize


def train_gates(ctx: RunContext, setup: Setup, proxy: LatencyProxy, calib: list, resume: bool) -> GatePhase:
    """Train (or, resumed, continue training) the gates; checkpoints go to the run folder.

    Raises :class:`RunInterrupted` after SIGINT/SIGTERM (a checkpoint is written first).
    """
    env, recipe = ctx.env, ctx.recipe
    ctx.store.set_segment_costs(proxy.unit_costs())  # what the cost-weighted L0 penalty weighs by
    kd_teacher, materialize = ctx.teacher, None
    if env.enabled and recipe.distributed.strategy == "fsdp":
        kd_teacher, materialize = _sharded(ctx)
    # probes are timed next to keep-all and put on the setup's scale, as the calibration points
    # are (sharded: the plain teacher waits in host memory, so the probe is timed alone)
    meter = ctx.meter if materialize else relative_meter(ctx.meter, ctx.teacher, setup.base_ms)
    probe = make_latency_probe(ctx.student, meter, ctx.device if materialize else None)
    trainer = LagrangeTrainer(
        ctx.student,
        kd_teacher,
        proxy,
        setup.target_ms,
        recipe.resolved("train"),
        probe=probe,
        calibration=calib,
        env=env,
        materialize=materialize,
    )
    seed_everything(recipe.seed)  # the gate phase starts from a state set by the seed alone
    if resume and has_checkpoint(ctx.paths.checkpoints):
        ck_t, ck, ck_path = load_checkpoint(ctx.paths.checkpoints)
        trainer.load_state(ck_t, ck)
        ctx.log(f"resuming gate training after step {trainer.step_idx} from {ck_path}")
    # rank 0 alone writes the metrics and checkpoints; the others would run on into the next
    # step's collective past a failed write, so each write tells every rank how it went
    metrics = main_only(env, lambda: open_metrics(ctx.paths, trainer.history, True)) or NoLog()

    def write_checkpoint(t: LagrangeTrainer) -> str:
        # sharded: every rank takes part in gathering the whole tensors; else rank 0 reads its own
        whole = t.state() if t.sharded else None

        def write() -> str:
            tensors, js = whole if whole is not None else t.state()
            return save_checkpoint(ctx.paths.checkpoints, t.step_idx, tensors, js)

        return on_main(env, write)

    try:
        with SignalFlag() as flag:
            try:
                history = trainer.fit(
                    ctx.train_loader,
                    on_step=lambda rec: main_only(env, lambda: metrics.write("gates", rec)),
                    checkpoint=write_checkpoint,
                    should_stop=lambda: flag.signum is not None,
                )
            except StopRequested as e:
                assert flag.signum is not None
                raise RunInterrupted(flag.signum, e.step, ctx.paths.out) from None
    finally:
        metrics.flush()
    if not history or "real_ms" not in history[-1]:
        history[-1].update(trainer.probe_now())

    student = ctx.student
    if materialize is not None:  # from here on: plain models (the slim model must fit one device)
        student = materialize().to(ctx.device)
        ctx.teacher.to(ctx.device)
    student.eval()
    landing = on_main(env, lambda: measure_landing(ctx, student, setup))
    ctx.log(
        f"gate training landed at {landing['measured_ms']:.2f} ms against a target of {landing['target_ms']:.2f} ms "
        f"({100 * landing['error']:+.1f}%), keeping {landing['units']} of {landing['units_total']} units"
    )
    return GatePhase(student, trainer, history, metrics, landing)
