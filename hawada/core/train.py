"""LagrangeTrainer: gate + weight training against the teacher under a latency constraint.

Objective per step (one forward/backward by default)::

    L = KD(student, teacher) + penalties(gates) + latency term, v = (proxy_ms - target_ms) / target_ms

    constraint "hinge":    latency term = lambda * relu(v),        lambda in [0, lambda_max]
    constraint "equality": latency term = lambda * v + mu * v**2,  lambda in [-lambda_max, lambda_max]

Penalties and the latency term depend only on the gate logits, so the weights' gradient of L
is exactly the KD gradient and one backward serves both optimizers. ``alternating=True``
keeps the two-pass step (weights from KD, then gates from the full objective on a new forward).
lambda follows projected dual ascent: lambda <- clip(lambda + lambda_lr * v, ...). The hinge only
pushes down: below the target only distillation reopens gates, so a run can overshoot and stay
there. The equality form (the Lagrangian of structured-pruning work that lands on a target size)
lets lambda go negative, which pushes gates back open, and its quadratic term damps the swing.

A bf16/fp16 student's weights are trained through fp32 master copies
(:class:`~hawada.core.loop.MasterWeights`): the forward and backward run in the model's dtype,
AdamW steps the masters, and the model holds the masters rounded after each applied step.
"""

from __future__ import annotations

import contextlib
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hawada.core.distill import KDConfig, kd_outputs_of, student_teacher_loss
from hawada.core.distributed import (
    SINGLE,
    DistEnv,
    ForwardOf,
    any_rank,
    broadcast_object,
    broadcast_tensors,
    check_replicated,
    clip_grad_norm,
    data_parallel,
    full_optimizer_state,
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    mean_over_ranks,
    on_main,
    reshard_optimizer_state,
    sync_replicated_grads,
)
from hawada.core.export import ExportPolicy, adapter_of, export, store_of
from hawada.core.gates import PenaltyWeights, combined_penalty, project_gates_into_constraints
from hawada.core.loop import MasterWeights, NonFiniteError, Progress, StepGuard, reseed_loader, to_device
from hawada.core.profiler import Meter
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.schema import check_fields, knob
from hawada.errors import InputError

__all__ = [
    "AMP_MODES",
    "LagrangeTrainer",
    "NonFiniteError",
    "StopRequested",
    "TrainConfig",
    "make_latency_probe",
]

AmpMode = Literal["off", "bf16", "fp16"]
Constraint = Literal["hinge", "equality"]
AMP_MODES = typing.get_args(AmpMode)


@dataclass
class TrainConfig:
    """Gate-training settings: the recipe's ``train`` section.

    ``seed``, ``progress``, ``penalties`` and ``kd`` are filled by the run from the recipe's
    top-level ``seed``/``progress`` and its ``penalties``/``kd`` sections (``kd.for_gates()``).
    """

    steps: int = knob(200, lo=1)
    lr_weights: float = knob(1e-4, lo=0.0)
    lr_gates: float = knob(0.05, lo=0.0, lo_open=True)
    weight_decay: float = knob(0.0, lo=0.0)
    lambda_lr: float = knob(0.5, lo=0.0, lo_open=True)
    lambda_max: float = knob(100.0, lo=0.0, lo_open=True)
    target_ramp_steps: int = knob(0, lo=0)
    constraint: Constraint = knob(
        "hinge", help="latency term: hinge (only above the target) or equality (both sides, lands on it)"
    )
    lambda_quad: float = knob(
        10.0, lo=0.0, help="constraint equality: weight mu of the quadratic term mu * v**2"
    )
    price_eval_frac: float = knob(
        0.25,
        lo=0.0,
        hi=1.0,
        help="last fraction of the gate steps (after the target ramp) in which the latency term "
        "prices the eval-mode keep set, the one export takes, with a straight-through gradient",
    )
    commit_layers: bool = knob(
        True,
        help="when the eval-set phase begins, fix every layer gate on its eval side (logit at "
        "+-gates.logit_clip) and stop training it: depth is decided, the widths land the keep set",
    )
    probe_every: int = knob(50, lo=0)
    alternating: bool = False
    amp: AmpMode = "off"
    grad_clip: float = knob(1.0, lo=0.0)
    anneal: bool = knob(True, help="anneal the gate temperature from gates.tau to gates.tau_final")
    checkpoint_every: int = knob(
        100, lo=0, help="write a resumable checkpoint every N gate steps; 0: only at a stop"
    )
    max_bad_steps: int = knob(
        5, lo=1, help="stop (with a checkpoint) after this many non-finite steps in a row"
    )
    progress: bool = knob(True, from_run="progress")
    seed: int = knob(0, from_run="seed")
    penalties: PenaltyWeights = knob(factory=PenaltyWeights, from_run="penalties")
    kd: KDConfig = knob(factory=KDConfig, from_run="kd")

    def __post_init__(self) -> None:
        check_fields(self, "train")


class StopRequested(Exception):
    """``fit`` stopped after a step because ``should_stop()`` said so; ``path`` is the checkpoint."""

    def __init__(self, step: int, path: str | None) -> None:
        super().__init__(f"stopped after step {step}")
        self.step, self.path = step, path


def make_latency_probe(
    gated: nn.Module, meter: Meter, device: torch.device | str | None = None
) -> Callable[..., dict]:
    """A closure that exports the current hard keep set and measures it with ``meter``.

    ``probe(model=None)`` exports ``model`` (default ``gated``), moved to ``device`` when given.
    """

    def probe(model: nn.Module | None = None) -> dict:
        slim = export(model if model is not None else gated, ExportPolicy(check=False))
        return meter(slim.to(device) if device is not None else slim).to_dict()

    return probe


class LagrangeTrainer:
    """Trains a gated student (weights + gates) against a frozen teacher under a latency target.

    Data-parallel (``env.world`` > 1): every rank passes its slice of the global batch, DDP
    averages the gradients of weights and gate logits, probes run on rank 0 and are broadcast,
    and after every step the gate logits, lambda and the proxy are checked to be identical on
    all ranks (:class:`~hawada.core.distributed.ReplicaMismatch` otherwise).

    Sharded (FSDP2: the student's layers hold DTensors): no DDP; FSDP reduce-scatters the
    layers' gradients and the replicated parameters' (gate logits included) are all-reduced;
    checkpoints hold whole tensors, and probes export the model ``materialize()`` returns.

    Args:
        student: a model returned by ``hawada.attach``.
        teacher: the unpruned model (kept in eval / inference mode).
        proxy: a calibrated :class:`LatencyProxy` over the student's GateStore.
        target_ms: the latency to reach (after the ramp).
        probe: optional closure returning a measured latency dict of the current keep set;
            called every ``cfg.probe_every`` steps, and the proxy is recalibrated on it.
        calibration: the (widths, ms) points the proxy was fitted on; probes are appended.
        env: the data-parallel job this process belongs to (default: a single process).
        materialize: sharded students: a collective call returning an unsharded copy of the
            gated student with the current weights (what probes export).

    Low-precision (bf16/fp16) weights: AdamW steps their fp32 masters (``self.master``); the
    masters are part of :meth:`state`, so a resume continues from the same fp32 values.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        proxy: LatencyProxy,
        target_ms: float,
        cfg: TrainConfig | None = None,
        probe: Callable[[], dict] | None = None,
        calibration: list | None = None,
        env: DistEnv = SINGLE,
        materialize: Callable[[], nn.Module] | None = None,
    ) -> None:
        self.cfg = cfg or TrainConfig()
        self.env, self.materialize = env, materialize
        self.sharded = is_sharded(student)
        if self.sharded and self.cfg.amp == "fp16":
            raise InputError(
                "train.amp fp16 (loss scaling) is not supported with sharded (fsdp) students; use bf16"
            )
        self.student, self.teacher, self.proxy = student, teacher, proxy
        self.adapter, self.store = adapter_of(student), store_of(student)
        if not target_ms > 0:
            raise ValueError(f"target latency must be > 0 ms, got {target_ms}")
        self.target_ms = float(target_ms)
        self.probe, self.calibration = probe, calibration if calibration is not None else []
        self.device = self.store.logits.device
        gate_ids = {id(self.store.logits)}
        self.weights = [p for p in student.parameters() if p.requires_grad and id(p) not in gate_ids]
        # what AdamW steps: fp32 masters of bf16/fp16 weights, the weights themselves otherwise
        self.master = MasterWeights(self.weights)
        # foreach kernels refuse lists mixing DTensors and plain tensors (sharded students)
        fe = False if self.sharded else None
        self.opt_w = (
            torch.optim.AdamW(
                self.master.params, lr=self.cfg.lr_weights, weight_decay=self.cfg.weight_decay, foreach=fe
            )
            if self.weights and self.cfg.lr_weights > 0
            else None
        )
        self.opt_g = torch.optim.Adam([self.store.logits], lr=self.cfg.lr_gates)
        # the student's forward as one module (DDP-wrapped when data-parallel)
        self.kd = self.cfg.kd.for_gates()  # kd.alpha_hidden_gates applies while the gates train
        hidden = self.kd.alpha_hidden > 0

        def outputs(m: nn.Module, b: Any) -> tuple:
            return kd_outputs_of(self.adapter, m, b, hidden)

        self.student_fwd = (
            ForwardOf(student, outputs) if self.sharded else data_parallel(student, outputs, env)
        )
        self.replica_checks = 0
        self.lam = torch.zeros((), device=self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")
        with torch.no_grad():
            self.start_ms = float(proxy(self.store.seg_units))
        self.step_idx = 0
        self.history: list[dict] = []
        self.last_real_ms: float | None = None
        # data position: batches of epoch ``epoch`` already consumed
        self.epoch, self.batch_pos = 0, 0
        self.guard = StepGuard(student, [self.opt_w, self.opt_g], "train", self.cfg.max_bad_steps, env)
        self._pending_rng: tuple[dict, dict] | None = None
        kinds: dict[str, list[int]] = {}
        for i, seg in enumerate(self.store.segments):
            kinds.setdefault(seg.kind, []).append(i)
        self._kind_index = {k: torch.tensor(v, device=self.device) for k, v in kinds.items()}
        self._layer_gates = torch.tensor(
            [g for s in self.store.segments if s.kind == "layer" for g in range(s.start, s.stop)],
            dtype=torch.long,
            device=self.device,
        )
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()

    # ------------------------------------------------------------------ pieces
    def target_at(self, step: int) -> float:
        """The ramped target: from the keep-all proxy latency to ``target_ms``."""
        r = self.cfg.target_ramp_steps
        if r <= 0 or step >= r:
            return self.target_ms
        return self.start_ms + (self.target_ms - self.start_ms) * step / r

    def _autocast(self):
        if self.cfg.amp == "off":
            return contextlib.nullcontext()
        dt = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dt)

    def _kd(self, batch: Any) -> torch.Tensor:
        # a sharded teacher all-gathers its layers into parameters: no inference tensors then
        return student_teacher_loss(
            self.adapter,
            self.student,
            self.teacher,
            batch,
            self.kd,
            self._autocast,
            student_forward=self.student_fwd,
            teacher_grad_off=torch.no_grad if self.sharded else torch.inference_mode,
        )

    def prices_eval_set(self, step: int) -> bool:
        """Whether step ``step`` prices the eval-mode keep set (the last ``price_eval_frac`` of
        the steps, never before the target ramp ends)."""
        f = self.cfg.price_eval_frac
        start = max(self.cfg.target_ramp_steps, int(round(self.cfg.steps * (1.0 - f))))
        return f > 0 and step >= start

    @torch.no_grad()
    def _commit_layers(self) -> None:
        """In the eval-set phase, pin every layer gate at ``+-logit_clip`` on its eval side.

        Why: a layer gate is one gate worth a whole layer's latency (a sixth of a 6-layer
        encoder). While the eval keep set is priced, the equality term pulls the keep set onto the
        target from both sides; a layer logit near 0 then flips open and shut, and the keep set
        export takes at the last step can sit a whole layer off the target (+20 % and +33 % on two
        of three demo runs). Pinned, depth stays where the trade-off put it during the ramp, and
        the fine-grained width gates alone land the keep set. At the clip the training samples of
        a pinned gate are (almost surely) its eval value, so training and export agree on depth.
        """
        if not self.cfg.commit_layers or self._layer_gates.numel() == 0:
            return
        if not self.prices_eval_set(self.step_idx):
            return
        lg = self.store.logits[self._layer_gates]
        clip = self.store.config.logit_clip
        self.store.logits[self._layer_gates] = torch.where(lg > 0, clip, -clip).to(lg.dtype)

    def _gate_terms(self, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pen = combined_penalty(self.store, self.cfg.penalties)
        proxy_ms = self.proxy(self.store.expected_units())
        if self.prices_eval_set(self.step_idx):
            # Train what you export (invariant 7). The expected widths price every gate by its
            # probability, but export keeps the gates with P(z != 0) > 1/2: while gates are not yet
            # saturated the two keep sets differ by tens of percent of the latency. So as training
            # ends, the hinge and lambda see the proxy of the eval keep set, and the gradient
            # reaches the logits through the expected widths (straight through): lambda then holds
            # the latency of the model export will take, and stops rising once that one is on target.
            hard_ms = self.proxy(self.store.open_units().detach())
            proxy_ms = proxy_ms + (hard_ms - proxy_ms).detach()
        # hinge: a bare signed term lambda * v keeps closing gates after the target is met while
        # lambda > 0 (Adam's step on the logits does not shrink with lambda), so only the excess is
        # priced and below the target only distillation reopens gates. equality: lambda may go
        # negative and reopen gates itself; the quadratic term pulls toward the target from both
        # sides with a force that shrinks as v does, which damps the swing of lambda.
        v = (proxy_ms - target) / target
        if self.cfg.constraint == "equality":
            lat = self.lam * v + self.cfg.lambda_quad * v * v
        else:
            lat = self.lam * torch.relu(v)
        return pen, lat, proxy_ms

    @property
    def bad_total(self) -> int:
        """Steps skipped so far for a non-finite loss or gradient."""
        return self.guard.total

    def _backward(self, loss: torch.Tensor) -> bool:
        """Backward of ``loss``; False (gradients discarded) when it or a gradient is not finite."""
        params = [*self.weights, self.store.logits]
        sync = (lambda: sync_replicated_grads(params, self.env)) if self.sharded else None
        return self.guard.backward(loss, params, self.scaler, after_backward=sync)

    def _step_opt(self, opt: torch.optim.Optimizer | None, params: list) -> None:
        if opt is None:
            return
        self.scaler.unscale_(opt)
        if self.cfg.grad_clip > 0:
            if self.sharded:
                clip_grad_norm(params, self.cfg.grad_clip, self.env)
            else:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(opt)

    def _step_weights(self) -> None:
        """Step the weights' optimizer on their fp32 masters, then round the masters into the model."""
        if self.opt_w is None:
            return
        self.master.grads_to_master()
        self._step_opt(self.opt_w, self.master.params)
        # after a step the fp16 scaler skipped the masters are unchanged: so is the model then
        self.master.to_model()

    # ------------------------------------------------------------------ one step
    def step(self, batch: Any) -> dict:
        """One training step on ``batch``; returns its metrics."""
        cfg = self.cfg
        self.student.train()
        target = self.target_at(self.step_idx)
        if cfg.anneal:
            self.store.anneal(self.step_idx, cfg.steps)
        self._commit_layers()
        terms: dict[str, torch.Tensor] = {}

        def body() -> bool:
            if cfg.alternating:  # weights from KD alone, then gates from the full objective
                kd_w = self._kd(batch)
                ok = self._backward(kd_w)
                self.store.logits.grad = None
                if not ok:
                    terms.update(zip(("kd", "pen", "lat", "proxy_ms"), (kd_w, *self._gate_terms(target))))
                    return False
                self._step_weights()
                if self.opt_w is not None:
                    self.opt_w.zero_grad(set_to_none=True)
            terms.update(zip(("kd", "pen", "lat", "proxy_ms"), (self._kd(batch), *self._gate_terms(target))))
            if not self._backward(terms["kd"] + terms["pen"] + terms["lat"]):
                return False
            if not cfg.alternating:
                self._step_weights()
            self._step_opt(self.opt_g, [self.store.logits])
            return True

        ok = self.guard.run(body)
        kd, pen, proxy_ms = terms["kd"], terms["pen"], terms["proxy_ms"]
        if ok:
            self.scaler.update()
            project_gates_into_constraints(self.store)
            self._commit_layers()  # the optimizer's momentum must not move a pinned layer gate
            with torch.no_grad():
                viol = (proxy_ms.detach() - target) / target
                lo = -cfg.lambda_max if cfg.constraint == "equality" else 0.0
                self.lam.add_(cfg.lambda_lr * viol).clamp_(lo, cfg.lambda_max)
        self.step_idx += 1
        self.check_replicas()
        opened = self.store.open_units()  # [S]
        rec = {
            "step": self.step_idx,
            "kd": mean_over_ranks(float(kd.detach()), self.env),  # the global batch's KD
            "penalty": float(pen.detach()),
            "lambda": float(self.lam),
            "proxy_ms": float(proxy_ms.detach()),
            "target_ms": target,
            "kept": float(opened.sum() / self.store.seg_units.sum()),
            "tau": float(self.store.tau),
            "prices_eval": self.prices_eval_set(self.step_idx - 1),
        }
        for kind, idx in self._kind_index.items():  # kept fraction per segment kind
            rec[f"kept_{kind}"] = float(opened[idx].sum() / self.store.seg_units[idx].sum())
        if not ok:
            rec["skipped"] = True
        if self.probe is not None and cfg.probe_every > 0 and self.step_idx % cfg.probe_every == 0:
            rec.update(self.probe_now())
        self.history.append(rec)
        return rec

    def probe_now(self) -> dict:
        """Measure the current hard keep set and recalibrate the proxy on it.

        Data-parallel: rank 0 measures (the others wait, so nothing else runs on the machine),
        every rank refits on the broadcast value, and rank 0's fit is broadcast so the proxy
        stays bitwise identical.
        """
        assert self.probe is not None
        if self.materialize is not None:  # collective: every rank gathers the whole student
            model = self.materialize()
            res = on_main(self.env, lambda: self.probe(model))
        else:
            res = on_main(self.env, self.probe)
        self.last_real_ms = res["median_ms"]
        fit = self.proxy.add_point_and_refit(self.store.open_units(), res["median_ms"], self.calibration)
        if self.env.enabled:
            broadcast_tensors(self.proxy.state_dict().values(), self.env)
            self.proxy.calibration, fit = broadcast_object((self.proxy.calibration, fit), self.env)
        return {"real_ms": res["median_ms"], "real_spread_ms": res["spread_ms"], "proxy_mape": fit["mape"]}

    def check_replicas(self) -> None:
        """Gate logits, lambda and the proxy must be identical on every rank (no-op alone)."""
        if not self.env.enabled:
            return
        named = {"gate logits": self.store.logits, "lambda": self.lam}
        named.update({f"proxy {k}": v for k, v in self.proxy.state_dict().items() if v.is_floating_point()})
        check_replicated(named, self.env, f"after gate step {self.step_idx}")
        self.replica_checks += 1

    # ------------------------------------------------------------------ state
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything gate training needs to continue exactly: (tensors, JSON-serialisable)."""
        from hawada.core.checkpoint import optimizer_state, rng_state

        sd = (
            full_state_dict(self.student) if self.sharded else self.student.state_dict()
        )  # collective if sharded
        tensors = {f"student.{k}": v for k, v in sd.items()}
        tensors.update({f"proxy.{k}": v for k, v in self.proxy.state_dict().items()})
        tensors["lam"] = self.lam
        tensors.update(self.master.state())  # collective if sharded
        js: dict[str, Any] = {}
        for name, opt in (("opt_w", self.opt_w), ("opt_g", self.opt_g)):
            if opt is not None:
                t, j = optimizer_state(opt, name, full_optimizer_state(opt) if self.sharded else None)
                tensors.update(t)
                js[name] = j
        for i, (w, _) in enumerate(self.calibration):
            tensors[f"calib.{i}"] = torch.as_tensor(w)
        rt, rj = rng_state()
        tensors.update(rt)
        js.update(
            step=self.step_idx,
            epoch=self.epoch,
            batch_pos=self.batch_pos,
            bad_total=self.guard.total,
            bad_in_row=self.guard.in_row,
            start_ms=self.start_ms,
            last_real_ms=self.last_real_ms,
            scaler=self.scaler.state_dict(),
            calib_ms=[float(m) for _, m in self.calibration],
            proxy_calibration=self.proxy.calibration,
            proxy_table_measured=bool(getattr(self.proxy, "table_measured", False)),
            rng=rj,
            history=self.history,
        )
        return tensors, js

    def load_state(self, tensors: dict[str, torch.Tensor], js: dict) -> None:
        """Restore :meth:`state`; the RNG states are applied when :meth:`fit` resumes."""
        from hawada.core.checkpoint import load_optimizer_state

        def sub(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        if self.sharded:
            load_full_state_dict(self.student, sub("student."))
        else:
            self.student.load_state_dict(sub("student."), strict=True)
        self.master.load(tensors)
        self.proxy.load_state_dict(sub("proxy."), strict=True)
        self.proxy.calibration = js["proxy_calibration"]
        if hasattr(self.proxy, "table_measured"):
            self.proxy.table_measured = js["proxy_table_measured"]
        with torch.no_grad():
            self.lam.copy_(tensors["lam"])
        for name, opt in (("opt_w", self.opt_w), ("opt_g", self.opt_g)):
            if opt is not None:
                load_optimizer_state(
                    opt,
                    name,
                    tensors,
                    js[name],
                    (lambda sd, o=opt: reshard_optimizer_state(o, sd)) if self.sharded else None,
                )
        if js["scaler"]:
            self.scaler.load_state_dict(js["scaler"])
        self.calibration[:] = [(tensors[f"calib.{i}"], ms) for i, ms in enumerate(js["calib_ms"])]
        self.step_idx, self.epoch, self.batch_pos = js["step"], js["epoch"], js["batch_pos"]
        self.guard.total, self.guard.in_row = js["bad_total"], js["bad_in_row"]
        self.start_ms, self.last_real_ms = js["start_ms"], js["last_real_ms"]
        self.history = list(js["history"])
        self._pending_rng = ({k: v for k, v in tensors.items() if k.startswith("rng.")}, js["rng"])

    def _epoch_iter(self, loader: Iterable) -> Iterator:
        """An iterator over ``loader`` at the data position (epoch, batch_pos)."""
        reseed_loader(loader, self.cfg.seed, self.epoch)
        it = iter(loader)
        for _ in range(self.batch_pos):
            if next(it, None) is None:
                break
        return it

    def fit(
        self,
        loader: Iterable,
        on_step: Callable[[dict], None] | None = None,
        checkpoint: Callable[[LagrangeTrainer], str] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[dict]:
        """Run up to ``cfg.steps`` steps over ``loader`` (epoch after epoch); returns the history.

        ``on_step(record)`` sees each step's metrics; ``checkpoint(trainer)`` writes one and
        returns its path (every ``cfg.checkpoint_every`` steps, at a stop, at the end);
        ``should_stop()`` is asked after each step: True writes a checkpoint and raises
        :class:`StopRequested`. ``cfg.max_bad_steps`` non-finite steps in a row write a
        checkpoint and raise :class:`NonFiniteError`.
        """
        from hawada.core.checkpoint import set_rng_state

        cfg = self.cfg
        bar = Progress(cfg.progress, cfg.steps, "gates", self.step_idx, self.env)
        t0 = time.perf_counter()
        it: Iterator | None = None
        last_ckpt = -1
        try:
            while self.step_idx < cfg.steps:
                if it is None:
                    it = self._epoch_iter(loader)
                    if self._pending_rng is not None:  # after the iterator: it may draw from the RNG
                        set_rng_state(*self._pending_rng)
                        self._pending_rng = None
                try:
                    batch = next(it)
                except StopIteration:
                    if self.batch_pos == 0:
                        raise ValueError("the data loader yielded no batch") from None
                    self.epoch, self.batch_pos, it = self.epoch + 1, 0, None
                    continue
                self.batch_pos += 1
                rec = self.step(to_device(batch, self.device))
                if on_step is not None:
                    on_step(rec)
                bar.update(
                    kd=f"{rec['kd']:.4f}",
                    lam=f"{rec['lambda']:.2f}",
                    proxy=f"{rec['proxy_ms']:.1f}ms",
                    real="-" if self.last_real_ms is None else f"{self.last_real_ms:.1f}ms",
                    kept=f"{rec['kept']:.2f}",
                )
                self.guard.check(rec["step"], (lambda: checkpoint(self)) if checkpoint is not None else None)
                stop = should_stop is not None and any_rank(should_stop(), self.env)
                every = cfg.checkpoint_every > 0 and self.step_idx % cfg.checkpoint_every == 0
                path = None
                if checkpoint is not None and (stop or every):
                    path, last_ckpt = checkpoint(self), self.step_idx
                if stop:
                    raise StopRequested(self.step_idx, path)
            if checkpoint is not None and last_ckpt != self.step_idx:
                checkpoint(self)
        finally:
            bar.close()
        self.seconds = time.perf_counter() - t0
        return self.history
