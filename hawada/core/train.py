"""LagrangeTrainer: gate + weight training against the teacher under a latency constraint.

Objective per step (one forward/backward by default)::

    L = KD(student, teacher) + penalties(gates) + lambda * (proxy_ms - target_ms) / target_ms

Penalties and the latency term depend only on the gate logits, so the weights' gradient of L
is exactly the KD gradient and one backward serves both optimizers. ``alternating=True``
keeps the two-pass step (weights from KD, then gates from the full objective on a new forward).
lambda follows projected dual ascent: lambda <- clip(lambda + lr * violation, 0, lambda_max).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hawada.core.distill import KDConfig, distill_loss
from hawada.core.export import ExportPolicy, adapter_of, export, store_of
from hawada.core.gates import PenaltyWeights, combined_penalty, project_gates_into_constraints
from hawada.core.profiler import Meter
from hawada.core.proxy_cost import LatencyProxy

AMP_MODES = ("off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Gate-training settings (all from the recipe's ``train`` section)."""

    steps: int = 200
    lr_weights: float = 1e-4
    lr_gates: float = 0.05
    weight_decay: float = 0.0
    lambda_lr: float = 0.5
    lambda_max: float = 100.0
    target_ramp_steps: int = 0
    probe_every: int = 50
    alternating: bool = False
    amp: str = "off"
    grad_clip: float = 1.0
    anneal: bool = True
    progress: bool = True
    penalties: PenaltyWeights = field(default_factory=PenaltyWeights)
    kd: KDConfig = field(default_factory=KDConfig)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"train.steps must be >= 1, got {self.steps}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train.amp must be one of {AMP_MODES}, got {self.amp!r}")


def cycle(loader: Iterable) -> Iterator:
    """Endless iteration over ``loader`` (re-iterated each epoch)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the data loader yielded no batch")


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_latency_probe(gated: nn.Module, meter: Meter) -> Callable[[], dict]:
    """A closure that exports the current hard keep set and measures it with ``meter``."""

    def probe() -> dict:
        return meter(export(gated, ExportPolicy(check=False))).to_dict()

    return probe


class LagrangeTrainer:
    """Trains a gated student (weights + gates) against a frozen teacher under a latency target.

    Args:
        student: a model returned by ``hawada.attach``.
        teacher: the unpruned model (kept in eval / inference mode).
        proxy: a calibrated :class:`LatencyProxy` over the student's GateStore.
        target_ms: the latency to reach (after the ramp).
        probe: optional closure returning a measured latency dict of the current keep set;
            called every ``cfg.probe_every`` steps, and the proxy is recalibrated on it.
        calibration: the (widths, ms) points the proxy was fitted on; probes are appended.
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
    ) -> None:
        self.cfg = cfg or TrainConfig()
        self.student, self.teacher, self.proxy = student, teacher, proxy
        self.adapter, self.store = adapter_of(student), store_of(student)
        if not target_ms > 0:
            raise ValueError(f"target latency must be > 0 ms, got {target_ms}")
        self.target_ms = float(target_ms)
        self.probe, self.calibration = probe, calibration if calibration is not None else []
        self.device = self.store.logits.device
        gate_ids = {id(self.store.logits)}
        self.weights = [p for p in student.parameters() if p.requires_grad and id(p) not in gate_ids]
        self.opt_w = (
            torch.optim.AdamW(self.weights, lr=self.cfg.lr_weights, weight_decay=self.cfg.weight_decay)
            if self.weights and self.cfg.lr_weights > 0
            else None
        )
        self.opt_g = torch.optim.Adam([self.store.logits], lr=self.cfg.lr_gates)
        self.lam = torch.zeros((), device=self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.amp == "fp16")
        with torch.no_grad():
            self.start_ms = float(proxy(self.store.seg_units))
        self.step_idx = 0
        self.history: list[dict] = []
        self.last_real_ms: float | None = None
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
        with torch.inference_mode(), self._autocast():
            t_out = self.adapter.output(self.teacher, batch)
        t_out = t_out.clone()  # a normal tensor, usable by autograd
        with self._autocast():
            s_out = self.adapter.output(self.student, batch)
        return distill_loss(s_out, t_out, self.cfg.kd, self.adapter.kd_kind, self.adapter.kd_mask(batch))

    def _gate_terms(self, target: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pen = combined_penalty(self.store, self.cfg.penalties)
        proxy_ms = self.proxy(self.store.expected_units())
        lat = self.lam * (proxy_ms - target) / target
        return pen, lat, proxy_ms

    def _step_opt(self, opt: torch.optim.Optimizer | None, params: list) -> None:
        if opt is None:
            return
        self.scaler.unscale_(opt)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.scaler.step(opt)

    # ------------------------------------------------------------------ one step
    def step(self, batch: Any) -> dict:
        """One training step on ``batch``; returns its metrics."""
        cfg = self.cfg
        self.student.train()
        target = self.target_at(self.step_idx)
        if cfg.anneal:
            self.store.anneal(self.step_idx, cfg.steps)
        for o in (self.opt_w, self.opt_g):
            if o is not None:
                o.zero_grad(set_to_none=True)
        if not cfg.alternating:
            kd = self._kd(batch)
            pen, lat, proxy_ms = self._gate_terms(target)
            self.scaler.scale(kd + pen + lat).backward()
            self._step_opt(self.opt_w, self.weights)
            self._step_opt(self.opt_g, [self.store.logits])
        else:
            kd_w = self._kd(batch)
            self.scaler.scale(kd_w).backward()
            self.store.logits.grad = None
            self._step_opt(self.opt_w, self.weights)
            if self.opt_w is not None:
                self.opt_w.zero_grad(set_to_none=True)
            kd = self._kd(batch)
            pen, lat, proxy_ms = self._gate_terms(target)
            self.scaler.scale(kd + pen + lat).backward()
            self._step_opt(self.opt_g, [self.store.logits])
        self.scaler.update()
        project_gates_into_constraints(self.store)
        with torch.no_grad():
            viol = (proxy_ms.detach() - target) / target
            self.lam.add_(cfg.lambda_lr * viol).clamp_(0.0, cfg.lambda_max)
        self.step_idx += 1
        rec = {
            "step": self.step_idx,
            "kd": float(kd.detach()),
            "penalty": float(pen.detach()),
            "lambda": float(self.lam),
            "proxy_ms": float(proxy_ms.detach()),
            "target_ms": target,
            "kept": float(self.store.open_units().sum() / self.store.seg_units.sum()),
            "tau": float(self.store.tau),
        }
        if self.probe is not None and cfg.probe_every > 0 and self.step_idx % cfg.probe_every == 0:
            rec.update(self.probe_now())
        self.history.append(rec)
        return rec

    def probe_now(self) -> dict:
        """Measure the current hard keep set and recalibrate the proxy on it."""
        assert self.probe is not None
        res = self.probe()
        self.last_real_ms = res["median_ms"]
        fit = self.proxy.add_point_and_refit(self.store.open_units(), res["median_ms"], self.calibration)
        return {"real_ms": res["median_ms"], "real_spread_ms": res["spread_ms"], "proxy_mape": fit["mape"]}

    def fit(self, loader: Iterable) -> list[dict]:
        """Run ``cfg.steps`` steps over ``loader`` (cycled); returns the history."""
        it = cycle(loader)
        bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, desc="gates", dynamic_ncols=True)
        t0 = time.perf_counter()
        try:
            while self.step_idx < self.cfg.steps:
                rec = self.step(to_device(next(it), self.device))
                if not math.isfinite(rec["kd"]):
                    raise FloatingPointError(f"non-finite KD loss at step {rec['step']}")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        kd=f"{rec['kd']:.4f}",
                        lam=f"{rec['lambda']:.2f}",
                        proxy=f"{rec['proxy_ms']:.1f}ms",
                        real="-" if self.last_real_ms is None else f"{self.last_real_ms:.1f}ms",
                        kept=f"{rec['kept']:.2f}",
                    )
        finally:
            if bar is not None:
                bar.close()
        self.seconds = time.perf_counter() - t0
        return self.history
