"""Distillation losses and teacher/student agreement metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from hawada.core.protocol import AdapterLike
from hawada.core.schema import check_fields, knob
from hawada.errors import InputError


@dataclass
class KDConfig:
    """Distillation loss weights.

    ``temperature``: softmax temperature T of the KL term (scaled by T^2).
    ``alpha_kl``/``alpha_mse``: weights of KL and logit MSE (models with logits).
    ``alpha_cos``/``alpha_emb_mse``: weights of cosine and MSE on embeddings (encoders).
    ``chunk_tokens``: rows per chunk for per-token KL over large vocabularies.
    ``alpha_hidden``: weight of the per-layer hidden-state loss (:func:`hidden_state_mse`,
    relative to the teacher's scale), for adapters whose pruned models keep the residual width.
    ``alpha_hidden_gates``: ``alpha_hidden`` while the gates train (:meth:`for_gates`).
    """

    temperature: float = knob(2.0, lo=0.0, lo_open=True)
    alpha_kl: float = knob(1.0, lo=0.0)
    alpha_mse: float = knob(0.0, lo=0.0)
    alpha_cos: float = knob(1.0, lo=0.0)
    alpha_emb_mse: float = knob(1.0, lo=0.0)
    chunk_tokens: int = knob(4096, lo=1)
    alpha_hidden: float = knob(
        0.0, lo=0.0, help="per-layer hidden-state MSE relative to the teacher's scale (hf_encoder)"
    )
    alpha_hidden_gates: float | None = knob(
        None,
        lo=0.0,
        help="alpha_hidden during gate training; null: alpha_hidden (a large one holds gates open)",
    )

    def __post_init__(self) -> None:
        check_fields(self, "kd")

    def for_gates(self) -> KDConfig:
        """The weights gate training uses: ``alpha_hidden_gates`` in place of ``alpha_hidden`` when set."""
        if self.alpha_hidden_gates is None:
            return self
        return dataclasses.replace(self, alpha_hidden=self.alpha_hidden_gates)


def _kl_rows(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[R, C], [R, C] -> [R]``: KL(teacher || student) per row at temperature T."""
    log_p_s = F.log_softmax(s.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(t.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2.

    Shapes: ``[B, C]`` logits give the batch mean (``batchmean``). ``[B, L, V]`` logits give
    the mean over the positions where ``mask`` (``[B, L]``, 1 = real token) is set, over all
    positions when ``mask`` is None. Sequence logits are processed ``chunk_tokens`` rows at a
    time so the soft targets of the whole batch are never held twice.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    c = student_logits.shape[-1]
    s = student_logits.reshape(-1, c)
    t = teacher_logits.reshape(-1, c).detach()
    if mask is not None:
        w = mask.reshape(-1).to(s.dtype if s.is_floating_point() else torch.float32)
        if w.numel() != s.shape[0]:
            raise ValueError(f"mask has {w.numel()} positions, logits have {s.shape[0]}")
    else:
        w = None
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], chunk_tokens):
        rows = _kl_rows(s[i : i + chunk_tokens], t[i : i + chunk_tokens], temperature)
        total = total + (rows if w is None else rows * w[i : i + chunk_tokens].float()).sum()
    denom = s.shape[0] if w is None else w.float().sum().clamp_min(1.0)
    return total / denom * temperature**2


def mse_reg(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with ``mask`` ``[B, L]`` for ``[B, L, D]`` inputs, over real tokens only."""
    diff = (student.float() - teacher.detach().float()) ** 2
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).unsqueeze(-1)
    return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp_min(1.0)


def hidden_state_mse(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    relative: bool = False,
) -> torch.Tensor:
    """Mean over layer pairs of the masked MSE of ``[B, L, D]`` hidden states (``mask`` ``[B, L]``).

    For models whose residual width is unchanged by pruning (heads and FFN are pruned, the
    hidden size is not), student and teacher states of the same layer are directly comparable.
    ``relative``: each layer's MSE is divided by the teacher's mean square on the same positions,
    so every layer weighs the same whatever the scale of its residual stream.
    """
    if len(student_states) != len(teacher_states) or not student_states:
        raise ValueError(
            f"hidden-state MSE needs the same, non-zero number of states, got {len(student_states)} "
            f"and {len(teacher_states)}"
        )
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states):
        err = mse_reg(s, t, mask)
        if relative:
            err = err / mse_reg(torch.zeros_like(t), t, mask).clamp_min(1e-12)
        total = total + err
    return total / len(student_states)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``[B, D], [B, D] -> scalar``: mean of 1 - cos(student, teacher)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1)).mean()


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: KDConfig) -> torch.Tensor:
    """``[B, D]`` embeddings: alpha_cos * cosine loss + alpha_emb_mse * MSE."""
    loss = student.new_zeros((), dtype=torch.float32)
    if cfg.alpha_cos:
        loss = loss + cfg.alpha_cos * cosine_loss(student, teacher)
    if cfg.alpha_emb_mse:
        loss = loss + cfg.alpha_emb_mse * mse_reg(student, teacher)
    return loss


def distill_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    cfg: KDConfig,
    kind: str = "logits",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The distillation loss an adapter asks for: ``kind`` is ``logits`` or ``embedding``."""
    if kind == "embedding":
        return embedding_loss(student_out, teacher_out, cfg)
    loss = student_out.new_zeros((), dtype=torch.float32)
    if cfg.alpha_kl:
        loss = loss + cfg.alpha_kl * kd_loss(
            student_out, teacher_out, cfg.temperature, mask, cfg.chunk_tokens
        )
    if cfg.alpha_mse:
        loss = loss + cfg.alpha_mse * mse_reg(student_out, teacher_out, mask)
    return loss


def student_teacher_loss(
    adapter: AdapterLike,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: Any,
    cfg: KDConfig,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    student_forward: Callable[[Any], tuple] | None = None,
    teacher_grad_off: Callable[[], AbstractContextManager] = torch.inference_mode,
) -> torch.Tensor:
    """The whole distillation loss of one batch: the teacher runs without gradient, the student
    with; ``distill_loss`` on the adapter's outputs, plus ``cfg.alpha_hidden`` times the relative
    per-layer hidden-state MSE (masked by ``adapter.kd_mask`` or the batch's attention mask)
    when ``cfg.alpha_hidden > 0`` (the states come from ``adapter.kd_outputs``).

    ``student_forward(batch) -> (output, states)``: how the student is called (e.g. through
    DDP; it must compute :func:`kd_outputs_of`); ``teacher_grad_off``: the no-gradient context
    of the teacher's forward (``torch.no_grad`` for a sharded teacher).
    """
    hidden = cfg.alpha_hidden > 0
    with teacher_grad_off(), autocast():
        t_out, t_states = kd_outputs_of(adapter, teacher, batch, hidden)
    t_out = t_out.clone()  # a normal tensor, usable by autograd
    with autocast():
        if student_forward is not None:
            s_out, s_states = student_forward(batch)
        else:
            s_out, s_states = kd_outputs_of(adapter, student, batch, hidden)
    mask = adapter.kd_mask(batch)
    loss = distill_loss(s_out, t_out, cfg, adapter.kd_kind, mask)
    if hidden:
        if mask is None and isinstance(batch, dict):
            mask = batch.get("attention_mask")
        t_states = [t.clone() for t in t_states]
        loss = loss + cfg.alpha_hidden * hidden_state_mse(s_states, t_states, mask, relative=True)
    return loss


def kd_outputs_of(adapter: AdapterLike, model: torch.nn.Module, batch: Any, hidden: bool) -> tuple:
    """``(output, per-layer hidden states or None)`` of ``model`` on ``batch``."""
    if not hidden:
        return adapter.output(model, batch), None
    out, states = adapter.kd_outputs(model, batch)
    if states is None:
        raise InputError(
            f"kd.alpha_hidden > 0, but the {adapter.family!r} family gives no hidden states to distil"
        )
    return out, states


# ---------------------------------------------------------------------- agreement metrics
@torch.no_grad()
def top1_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of rows (``[B, C]``) where the student's argmax equals the teacher's."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


@torch.no_grad()
def mean_cosine(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean cosine similarity of ``[B, D]`` embeddings."""
    return F.cosine_similarity(student.float(), teacher.float(), dim=-1).mean().item()


@torch.no_grad()
def retrieval_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> dict[str, float]:
    """Nearest-neighbour agreement of ``[N, D]`` embeddings over the same N items.

    For each item, its neighbours (itself excluded) by cosine under each model:
    ``top1`` = fraction whose nearest neighbour is the same, ``top{k}`` = mean overlap of the
    k-nearest sets.
    """
    n = student.shape[0]
    if n < 2:
        raise ValueError("retrieval agreement needs at least 2 items")
    k = min(k, n - 1)

    def knn(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices

    ks, kt = knn(student), knn(teacher)
    top1 = (ks[:, 0] == kt[:, 0]).float().mean().item()
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(ks, kt)]).mean().item()
    return {"top1": top1, f"top{k}": overlap}
