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
from hawada.core.distributed import fully_shard_layers
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
    """The trained gates: ``student`` is the plain (unsharded) gated student, in eval mode."""

    student: nn.Module
    trainer: LagrangeTrainer
    history: list[dict]
    metrics: MetricsLog | NoLog


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
    probe = make_latency_probe(ctx.student, ctx.meter, ctx.device if materialize else None)
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
    metrics = open_metrics(ctx.paths, trainer.history, env.is_main)

    def write_checkpoint(t: LagrangeTrainer) -> str:
        if not env.is_main and not t.sharded:  # every rank holds the same state: rank 0 writes it
            return ""
        tensors, js = t.state()  # sharded: a collective gather of the whole tensors
        return save_checkpoint(ctx.paths.checkpoints, t.step_idx, tensors, js) if env.is_main else ""

    try:
        with SignalFlag() as flag:
            try:
                history = trainer.fit(
                    ctx.train_loader,
                    on_step=lambda rec: metrics.write("gates", rec),
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
    return GatePhase(student, trainer, history, metrics)
