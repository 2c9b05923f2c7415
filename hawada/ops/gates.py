"""Whole-store gate ops: sample/probabilities, penalties + expected widths, constraint projection.

Each op works on the flat logits vector of a GateStore and its segment table, in one launch on
the Triton backend, with the torch reference as the always-available path. These are the only
copies of the gate formulas: :class:`hawada.core.gates.GateStore` calls the ops and never picks a
backend itself. ``tau`` is a 0-d tensor (the store's buffer), so nothing syncs with the host.

Modes: ``hard_concrete`` — z = clamp(sigmoid((log u - log(1-u) + l) / tau) (zeta - gamma) + gamma,
0, 1), P(z > 0) = sigmoid(l - tau log(-gamma / zeta)); ``sigmoid`` — z = sigmoid(l / tau);
``ste`` — z ~ Bernoulli(sigmoid(l / tau)) with the straight-through gradient of sigmoid(l / tau).
"""

from __future__ import annotations

import math
import typing
from typing import Literal, NamedTuple, Protocol

import torch

from hawada.ops.backend import resolve_backend

GateMode = Literal["hard_concrete", "sigmoid", "ste"]
GATE_MODES: tuple[str, ...] = typing.get_args(GateMode)
_MODE_ID = {m: i for i, m in enumerate(GATE_MODES)}


class SegmentTable(NamedTuple):
    """A GateStore's segment table (its buffers): ``seg_id [N]`` int64, ``gate_size [N]`` fp32,
    ``seg_start [S]`` int64, ``seg_units [S]`` fp32, ``seg_min_keep [S]`` int64."""

    seg_id: torch.Tensor
    gate_size: torch.Tensor
    seg_start: torch.Tensor
    seg_units: torch.Tensor
    seg_min_keep: torch.Tensor


class Weights(Protocol):
    """Penalty weights (``hawada.core.gates.PenaltyWeights`` has these fields)."""

    l0: float
    floor: float
    floor_frac: float
    bimodal: float
    cost_weighted: bool


class PenaltyTerms(NamedTuple):
    """``total`` = l0 * w_l0 + floor * w_floor + bimodal * w_bimodal (scalars); ``expected_units [S]``."""

    total: torch.Tensor
    l0: torch.Tensor
    floor: torch.Tensor
    bimodal: torch.Tensor
    expected_units: torch.Tensor


def _check_mode(mode: str) -> None:
    if mode not in _MODE_ID:
        raise ValueError(f"gate mode {mode!r} is not one of {GATE_MODES}")


def log_ratio(stretch: tuple[float, float]) -> float:
    """``log(-gamma / zeta)`` of the hard-concrete stretch."""
    gamma, zeta = stretch
    return math.log(-gamma / zeta)


def _block(n: int) -> int:
    return 1024


# ====================================================================== gate_sample / gate_probs
def gate_probs_ref(logits: torch.Tensor, tau: torch.Tensor, mode: str, lr: float) -> torch.Tensor:
    """``[N]`` probability each gate is non-zero (``lr`` = :func:`log_ratio` of the stretch)."""
    if mode == "hard_concrete":
        # the logit is the log-odds of a non-zero gate (see gate_sample_ref), whatever tau is
        return torch.sigmoid(logits)
    return torch.sigmoid(logits / tau)


def gate_sample_ref(
    logits: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor, mode: str, gamma: float, zeta: float
) -> torch.Tensor:
    """``[N]`` gate values of one training forward; ``noise [N]`` uniform(0, 1) (differentiable)."""
    if mode == "sigmoid":
        return torch.sigmoid(logits / tau)
    if mode == "ste":
        p = torch.sigmoid(logits / tau)
        hard = (noise < p).to(logits.dtype)
        return hard + p - p.detach()
    # location log(alpha) = l + tau log(-gamma/zeta): P(z != 0) = sigmoid(l), so "open iff l > 0",
    # the eval rule, is "open iff P(z != 0) > 1/2" under the distribution training samples from
    u = noise.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits + tau * math.log(-gamma / zeta)) / tau)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def _gate_grad_ref(logits, noise, tau, mode, sample, gamma, zeta, lr):
    """``dz/dl`` per gate, the formulas of the Triton backward."""
    if sample and mode == "hard_concrete":
        u = noise.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits + tau * lr) / tau)
        pre = s * (zeta - gamma) + gamma
        return ((pre >= 0) & (pre <= 1)).to(logits.dtype) * (zeta - gamma) * s * (1 - s) / tau
    p = gate_probs_ref(logits, tau, mode, lr)
    return p * (1 - p) if mode == "hard_concrete" else p * (1 - p) / tau


def _gate_triton(kernel_name, n, *args, **flags):
    from hawada.kernels import gates as kg

    block = _block(n)
    getattr(kg, kernel_name)[(max(1, -(-n // block)),)](*args, **flags, BLOCK=block)


@torch.library.custom_op("hawada::gate_sample", mutates_args=())
def _gate_sample_op(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    tau: torch.Tensor,
    mode: str,
    sample: bool,
    gamma: float,
    zeta: float,
) -> torch.Tensor:
    lr = math.log(-gamma / zeta)
    if resolve_backend(logits, tau) == "torch":
        if sample:
            return gate_sample_ref(logits, noise, tau, mode, gamma, zeta)
        return gate_probs_ref(logits, tau, mode, lr)
    out = torch.empty_like(logits)
    n = logits.numel()
    nz = noise if noise is not None else logits
    _gate_triton(
        "gate_fwd_kernel", n, logits, nz, tau, out, n, gamma, zeta, lr,
        SAMPLE=int(sample), MODE=_MODE_ID[mode],
    )  # fmt: skip
    return out


@_gate_sample_op.register_fake
def _(logits, noise, tau, mode, sample, gamma, zeta):
    return torch.empty_like(logits)


@torch.library.custom_op("hawada::gate_sample_backward", mutates_args=())
def _gate_sample_bwd_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    tau: torch.Tensor,
    mode: str,
    sample: bool,
    gamma: float,
    zeta: float,
) -> torch.Tensor:
    lr = math.log(-gamma / zeta)
    if resolve_backend(logits, tau) == "torch":
        return grad * _gate_grad_ref(logits, noise, tau, mode, sample, gamma, zeta, lr)
    out = torch.empty_like(logits)
    n = logits.numel()
    nz = noise if noise is not None else logits
    _gate_triton(
        "gate_bwd_kernel", n, logits, nz, tau, grad.contiguous(), out, n, gamma, zeta, lr,
        SAMPLE=int(sample), MODE=_MODE_ID[mode],
    )  # fmt: skip
    return out


@_gate_sample_bwd_op.register_fake
def _(grad, logits, noise, tau, mode, sample, gamma, zeta):
    return torch.empty_like(logits)


def _gs_setup(ctx, inputs, output):
    logits, noise, tau, mode, sample, gamma, zeta = inputs
    ctx.save_for_backward(logits, noise, tau)
    ctx.args = (mode, sample, gamma, zeta)


def _gs_backward(ctx, grad):
    logits, noise, tau = ctx.saved_tensors
    return _gate_sample_bwd_op(grad, logits, noise, tau, *ctx.args), None, None, None, None, None, None


_gate_sample_op.register_autograd(_gs_backward, setup_context=_gs_setup)


def _check_flat(logits: torch.Tensor, tau: torch.Tensor) -> None:
    if logits.dim() != 1 or not logits.is_contiguous():
        raise ValueError(f"gate logits must be a contiguous 1-D tensor, got shape {tuple(logits.shape)}")
    if tau.dim() != 0:
        raise ValueError(f"gate tau must be a 0-d tensor, got shape {tuple(tau.shape)}")


def gate_sample(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    tau: torch.Tensor,
    mode: GateMode,
    stretch: tuple[float, float] = (-0.1, 1.1),
) -> torch.Tensor:
    """``[N]`` gate values for one training forward of the whole store (one launch).

    ``logits [N]``, ``noise [N]`` uniform(0, 1) draws (None: drawn here; unused by ``sigmoid``),
    ``tau`` 0-d. Differentiable w.r.t. ``logits`` (straight-through for ``ste``).
    """
    _check_mode(mode)
    _check_flat(logits, tau)
    if mode != "sigmoid" and noise is None:
        noise = torch.rand_like(logits)
    if mode == "sigmoid":
        noise = None
    elif noise.shape != logits.shape:
        raise ValueError(f"gate noise must have shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
    return _gate_sample_op(logits, noise, tau, mode, True, float(stretch[0]), float(stretch[1]))


def gate_probs(
    logits: torch.Tensor, tau: torch.Tensor, mode: GateMode, stretch: tuple[float, float] = (-0.1, 1.1)
) -> torch.Tensor:
    """``[N]`` probability each gate is non-zero under ``mode``'s training distribution (one launch)."""
    _check_mode(mode)
    _check_flat(logits, tau)
    return _gate_sample_op(logits, None, tau, mode, False, float(stretch[0]), float(stretch[1]))


# ====================================================================== gate_penalties
def gate_penalties_ref(
    logits: torch.Tensor,
    seg_id: torch.Tensor,
    gate_size: torch.Tensor,
    seg_units: torch.Tensor,
    seg_cost: torch.Tensor,
    tau: torch.Tensor,
    w_l0: float,
    w_floor: float,
    floor_frac: float,
    w_bim: float,
    cost_weighted: bool,
    mode: str,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats [5], expected_units [S])``; stats = [total, l0, floor, bimodal, l0 denominator]."""
    p = gate_probs_ref(logits, tau, mode, lr)
    w = gate_size * seg_cost[seg_id] if cost_weighted else gate_size
    den = w.sum()
    l0 = (p * w).sum() / den.clamp_min(1e-12)
    exp_u = p.new_zeros(seg_units.numel()).index_add(0, seg_id, p * gate_size)
    short = torch.relu(floor_frac * seg_units - exp_u) / seg_units
    floor = (short * short).mean()
    bim = (p * (1 - p)).mean()
    total = w_l0 * l0 + w_floor * floor + w_bim * bim
    return torch.stack([total, l0, floor, bim, den]), exp_u


def _penalty_grad_ref(gstats, gexp, logits, seg_id, gate_size, seg_units, seg_cost, tau, exp_u, stats, args):
    w_l0, w_floor, floor_frac, w_bim, cost_weighted, mode, lr = args
    p = gate_probs_ref(logits, tau, mode, lr)
    n, s = logits.numel(), seg_units.numel()
    w = gate_size * seg_cost[seg_id] if cost_weighted else gate_size
    c_l0 = gstats[0] * w_l0 + gstats[1]
    c_fl = gstats[0] * w_floor + gstats[2]
    c_bi = gstats[0] * w_bim + gstats[3]
    gap = floor_frac * seg_units - exp_u
    short = torch.relu(gap) / seg_units
    d_e = torch.where(gap > 0, -2.0 * short / seg_units / s, torch.zeros_like(gap)) * c_fl + gexp
    dp = c_l0 * w / stats[4].clamp_min(1e-12) + d_e[seg_id] * gate_size + c_bi * (1 - 2 * p) / n
    return dp * p * (1 - p) if mode == "hard_concrete" else dp * p * (1 - p) / tau


@torch.library.custom_op("hawada::gate_penalties", mutates_args=())
def _penalties_op(
    logits: torch.Tensor,
    seg_id: torch.Tensor,
    gate_size: torch.Tensor,
    seg_units: torch.Tensor,
    seg_cost: torch.Tensor,
    tau: torch.Tensor,
    w_l0: float,
    w_floor: float,
    floor_frac: float,
    w_bim: float,
    cost_weighted: bool,
    mode: str,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (w_l0, w_floor, floor_frac, w_bim, cost_weighted, mode, lr)
    if resolve_backend(logits, tau) == "torch":
        return gate_penalties_ref(logits, seg_id, gate_size, seg_units, seg_cost, tau, *args)
    from hawada.kernels import gates as kg

    n, s = logits.numel(), seg_units.numel()
    stats = torch.empty(5, device=logits.device, dtype=torch.float32)
    exp_u = torch.empty(s, device=logits.device, dtype=torch.float32)
    kg.penalty_fwd_kernel[(1,)](
        logits, seg_id, gate_size, seg_units, seg_cost, tau, exp_u, stats,
        n, s, lr, w_l0, w_floor, floor_frac, w_bim,
        MODE=_MODE_ID[mode], COST_W=bool(cost_weighted), BLOCK=1024, BLOCK_S=256, num_warps=8,
    )  # fmt: skip
    return stats, exp_u


@_penalties_op.register_fake
def _(logits, seg_id, gate_size, seg_units, seg_cost, tau, *args):
    return logits.new_empty(5), logits.new_empty(seg_units.shape[0])


@torch.library.custom_op("hawada::gate_penalties_backward", mutates_args=())
def _penalties_bwd_op(
    gstats: torch.Tensor,
    gexp: torch.Tensor,
    logits: torch.Tensor,
    seg_id: torch.Tensor,
    gate_size: torch.Tensor,
    seg_units: torch.Tensor,
    seg_cost: torch.Tensor,
    tau: torch.Tensor,
    exp_u: torch.Tensor,
    stats: torch.Tensor,
    w_l0: float,
    w_floor: float,
    floor_frac: float,
    w_bim: float,
    cost_weighted: bool,
    mode: str,
    lr: float,
) -> torch.Tensor:
    args = (w_l0, w_floor, floor_frac, w_bim, cost_weighted, mode, lr)
    tensors = (gstats, gexp, logits, seg_id, gate_size, seg_units, seg_cost, tau, exp_u, stats)
    if resolve_backend(logits, tau) == "torch":
        return _penalty_grad_ref(*tensors, args)
    from hawada.kernels import gates as kg

    n, s = logits.numel(), seg_units.numel()
    out = torch.empty_like(logits)
    block = _block(n)
    kg.penalty_bwd_kernel[(max(1, -(-n // block)),)](
        logits, seg_id, gate_size, seg_units, seg_cost, tau, exp_u, stats,
        gstats.contiguous(), gexp.contiguous(), out,
        n, s, lr, w_l0, w_floor, floor_frac, w_bim,
        MODE=_MODE_ID[mode], COST_W=bool(cost_weighted), BLOCK=block,
    )  # fmt: skip
    return out


@_penalties_bwd_op.register_fake
def _(gstats, gexp, logits, *args):
    return torch.empty_like(logits)


def _pen_setup(ctx, inputs, output):
    logits, seg_id, gate_size, seg_units, seg_cost, tau = inputs[:6]
    stats, exp_u = output
    ctx.save_for_backward(logits, seg_id, gate_size, seg_units, seg_cost, tau, exp_u, stats)
    ctx.args = inputs[6:]


def _pen_backward(ctx, gstats, gexp):
    saved = ctx.saved_tensors
    logits = saved[0]
    gstats = torch.zeros(5, device=logits.device) if gstats is None else gstats.float()
    gexp = torch.zeros_like(saved[6]) if gexp is None else gexp.float()
    g = _penalties_bwd_op(gstats, gexp, *saved, *ctx.args)
    return (g,) + (None,) * 12


_penalties_op.register_autograd(_pen_backward, setup_context=_pen_setup)


def gate_penalties(
    logits: torch.Tensor,
    segments: SegmentTable,
    costs: torch.Tensor,
    tau: torch.Tensor,
    weights: Weights,
    mode: GateMode = "hard_concrete",
    stretch: tuple[float, float] = (-0.1, 1.1),
) -> PenaltyTerms:
    """Expected-L0 (cost-weighted), keep-floor, bimodality and per-segment expected widths, one launch.

    ``logits [N]`` fp32, ``costs [S]`` per-unit cost of each segment, ``tau`` 0-d. Terms (p = gate
    probabilities, w = gate size x segment cost, or gate size alone without ``cost_weighted``):
    ``l0`` = sum(p w) / sum(w); ``expected_units [S]`` = per-segment sum of p x gate size;
    ``floor`` = mean over segments of relu(floor_frac units - expected_units) ** 2 / units ** 2;
    ``bimodal`` = mean p (1 - p). Every output is differentiable.
    """
    _check_mode(mode)
    _check_flat(logits, tau)
    if logits.numel() == 0 or segments.seg_units.numel() == 0:
        raise ValueError("gate_penalties needs a store with at least one gate")
    if logits.dtype != torch.float32:
        raise ValueError(f"gate_penalties expects fp32 logits, got {logits.dtype}")
    stats, exp_u = _penalties_op(
        logits,
        segments.seg_id,
        segments.gate_size,
        segments.seg_units,
        costs,
        tau,
        float(weights.l0),
        float(weights.floor),
        float(weights.floor_frac),
        float(weights.bimodal),
        bool(weights.cost_weighted),
        mode,
        log_ratio(stretch),
    )
    return PenaltyTerms(stats[0], stats[1], stats[2], stats[3], exp_u)


# ====================================================================== project_gates
def project_gates_ref(
    logits: torch.Tensor,
    seg_id: torch.Tensor,
    seg_start: torch.Tensor,
    min_keep: torch.Tensor,
    clip: float,
    margin: float,
) -> None:
    """In place: clamp to ``[-clip, clip]``; the ``min_keep`` largest gates of each segment (stable
    order on ties) are raised to ``>= margin``. Two stable sorts give each gate's rank in its segment."""
    lg = logits
    lg.clamp_(-clip, clip)
    order = torch.sort(lg, descending=True, stable=True).indices
    order = order[torch.sort(seg_id[order], stable=True).indices]
    seg_of = seg_id[order]
    rank = torch.arange(lg.numel(), device=lg.device) - seg_start[seg_of]
    need = rank < min_keep[seg_of]
    vals = lg[order]
    lg[order] = torch.where(need, vals.clamp_min(margin), vals)


@torch.library.custom_op("hawada::project_gates", mutates_args=("logits",))
def _project_op(
    logits: torch.Tensor,
    seg_id: torch.Tensor,
    seg_start: torch.Tensor,
    min_keep: torch.Tensor,
    clip: float,
    margin: float,
) -> None:
    if resolve_backend(logits, seg_start) == "torch":
        project_gates_ref(logits, seg_id, seg_start, min_keep, clip, margin)
        return
    from hawada.kernels import gates as kg

    s = seg_start.numel()
    kg.project_kernel[(s,)](logits, seg_start, min_keep, logits.numel(), s, clip, margin, BI=64, BJ=64)


@_project_op.register_fake
def _(logits, seg_id, seg_start, min_keep, clip, margin):
    return None


def project_gates(
    logits: torch.Tensor,
    segments: SegmentTable,
    min_keep: torch.Tensor,
    clip: float = 10.0,
    margin: float = 0.05,
) -> None:
    """In place, one launch, no host sync: clamp ``logits [N]`` into ``[-clip, clip]`` and raise the
    ``min_keep [S]`` largest gates of each segment to ``>= margin`` (ties: lower index first).

    Not differentiable (a projection step between optimiser steps): call it under ``no_grad``.
    """
    _check_flat(logits, torch.zeros(()))
    if logits.numel() == 0:
        return
    _project_op(logits, segments.seg_id, segments.seg_start, min_keep, float(clip), float(margin))
