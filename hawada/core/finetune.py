"""KD fine-tuning of an exported (plain, slim) model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from hawada.core.distill import KDConfig, kd_outputs_of, student_teacher_loss
from hawada.core.distributed import SINGLE, DistEnv, data_parallel, on_main
from hawada.core.loop import MasterWeights, Progress, StepGuard, cycle, to_device
from hawada.core.protocol import AdapterLike
from hawada.core.qat import qat_scheme, quantization_aware
from hawada.core.schema import check_fields, knob

QatMode = Literal["auto", "on", "off"]


@dataclass
class FinetuneConfig:
    """``steps`` of AdamW at ``lr`` with linear warm-up then cosine decay, stepped per step."""

    steps: int = knob(100, lo=0)
    lr: float = knob(1e-4, lo=0.0, lo_open=True)
    weight_decay: float = knob(0.0, lo=0.0)
    warmup_steps: int = knob(10, lo=0)
    eval_every: int = knob(50, lo=1)
    bn_recalib_batches: int = knob(10, lo=0)
    grad_clip: float = knob(1.0, lo=0.0)
    max_bad_steps: int = knob(5, lo=1, from_run="train.max_bad_steps")
    progress: bool = knob(True, from_run="progress")
    qat: QatMode = knob(
        "auto",
        help="quantization-aware fine-tuning (fake int8 weights per channel and activations per tensor in "
        "the Linear layers): auto = on when measure.runtime is int8_dynamic or onnxruntime_int8",
    )
    runtime: str = knob("eager", from_run="measure.runtime")

    def __post_init__(self) -> None:
        check_fields(self, "finetune")


def lr_lambda(step: int, warmup: int, total: int) -> float:
    """Multiplier of the base LR at ``step``: linear warm-up, then cosine to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable, model_inputs: Callable[[Any], Any], batches: int, device: torch.device
) -> int:
    """Re-estimate every BatchNorm's running statistics (cumulative average over ``batches``).

    Returns the number of BN layers reset (0 leaves the model untouched).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    it = cycle(loader)
    for _ in range(batches):
        x = model_inputs(to_device(next(it), device))
        model(**x) if isinstance(x, dict) else model(x)
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        m.train(tr)
    model.train(was)
    return len(bns)


def finetune_student(
    student: nn.Module,
    teacher: nn.Module,
    adapter: AdapterLike,
    loader: Iterable,
    cfg: FinetuneConfig | None = None,
    kd: KDConfig | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    env: DistEnv = SINGLE,
) -> tuple[nn.Module, list[dict]]:
    """KD fine-tune ``student`` in place against ``teacher``; returns (best model, history).

    ``evaluate(model) -> score`` (higher is better) runs every ``cfg.eval_every`` steps and
    at the end; the best-scoring weights are kept. BatchNorm statistics are recalibrated on
    the training data before training and before each evaluation. A step whose loss or gradient
    is not finite (on any rank) changes nothing (weights, optimizer, BatchNorm statistics) and
    is recorded as ``skipped``; ``cfg.max_bad_steps`` of them in a row raise
    :class:`NonFiniteError` naming the step. Data-parallel (``env``):
    ``loader`` yields this rank's slice of each batch, DDP averages the gradients, and the
    evaluation runs on rank 0 with its score broadcast (every rank keeps the same weights).
    bf16/fp16 weights are trained through fp32 masters (:class:`~hawada.core.loop.MasterWeights`):
    AdamW steps the masters and the model holds them rounded after each applied step.

    Quantization-aware (``cfg.qat``, see :mod:`hawada.core.qat`): the Linear layers compute with
    fake int8 operands throughout, evaluations included, so the state kept is the one whose int8
    deployment scores best; the returned model is plain fp32 again.
    """
    cfg, kd = cfg or FinetuneConfig(), kd or KDConfig()
    scheme = qat_scheme(cfg.qat, cfg.runtime)
    if scheme is None:
        return _finetune(student, teacher, adapter, loader, cfg, kd, evaluate, env)
    with quantization_aware(student, scheme):
        return _finetune(student, teacher, adapter, loader, cfg, kd, evaluate, env)


def _finetune(
    student: nn.Module,
    teacher: nn.Module,
    adapter: AdapterLike,
    loader: Iterable,
    cfg: FinetuneConfig,
    kd: KDConfig,
    evaluate: Callable[[nn.Module], float] | None,
    env: DistEnv,
) -> tuple[nn.Module, list[dict]]:
    device = next(student.parameters()).device
    teacher.eval()
    hist: list[dict] = []

    def recal():
        return recalibrate_batchnorm(student, loader, adapter.model_inputs, cfg.bn_recalib_batches, device)

    recal()
    best_score, best_state = -math.inf, None

    def consider(step: int) -> None:
        nonlocal best_score, best_state
        if evaluate is None:
            return
        score = float(on_main(env, lambda: evaluate(student)))
        hist.append({"step": step, "eval": score})
        if score > best_score:
            best_score, best_state = score, copy.deepcopy(student.state_dict())

    consider(0)
    if cfg.steps > 0:
        params = [p for p in student.parameters() if p.requires_grad]
        master = MasterWeights(params)  # what AdamW steps: fp32 masters of bf16/fp16 weights
        opt = torch.optim.AdamW(master.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.steps))
        hidden = kd.alpha_hidden > 0
        fwd = data_parallel(student, lambda m, b: kd_outputs_of(adapter, m, b, hidden), env)
        it = cycle(loader)
        bar = Progress(cfg.progress, cfg.steps, "finetune", env=env)
        guard = StepGuard(student, [opt], "finetune", cfg.max_bad_steps, env)

        def body(batch: Any, out: dict[str, torch.Tensor]) -> bool:
            out["loss"] = student_teacher_loss(adapter, student, teacher, batch, kd, student_forward=fwd)
            if not guard.backward(out["loss"], params):
                return False
            master.grads_to_master()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(master.params, cfg.grad_clip)
            opt.step()
            master.to_model()
            sched.step()
            return True

        for step in range(1, cfg.steps + 1):
            student.train()
            out: dict[str, torch.Tensor] = {}
            lr = sched.get_last_lr()[0]
            ok = guard.run(body, to_device(next(it), device), out)
            rec = {"step": step, "kd": float(out["loss"].detach()), "lr": lr}
            if not ok:
                rec["skipped"] = True
            hist.append(rec)
            guard.check(step)
            bar.update(kd=f"{rec['kd']:.4f}")
            if evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                recal()
                consider(step)
        bar.close()
        if evaluate is None:
            recal()
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    return student, hist
