"""Differentiable latency proxy, calibrated on the target device.

Adapters describe a model as :class:`CostTerm` s: one per op whose cost depends on gated
widths (a convolution reads ``in`` channels and writes ``out`` channels, an attention layer
has ``heads`` heads, ...). Each dimension of a term is either a segment of the GateStore
(its width varies) or a fixed integer.

Two modes, both vectorised over all terms (no Python loop per layer on the hot path):

* ``analytic``: latency = a * FLOPs(w) + b * bytes(w) + c * ops(w) + d, fitted by
  non-negative least squares on several measured sub-architectures.
* ``lut``: each term's real latency is measured on the device at a grid of widths and
  interpolated (multi-)linearly, so the proxy sees the device's staircase; the sum is then
  calibrated (scale + intercept) on several measured whole sub-architectures, because
  isolated ops do not add up exactly to a model.
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from hawada.core.gates import GateStore
from hawada.core.profiler import measure_latency_ms
from hawada.core.schema import check_fields, knob

ProxyMode = Literal["lut", "analytic"]
PROXY_MODES = typing.get_args(ProxyMode)
GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
MAX_DIMS = 2


@dataclass
class ProxyConfig:
    """How the latency proxy is built and calibrated: the recipe's ``proxy`` section."""

    mode: ProxyMode = "lut"
    calib_points: int = knob(6, lo=2, help="measured sub-architectures the proxy is calibrated on")
    lut_repeats: int = knob(5, lo=1, help="timed runs per lookup-table op (at least)")
    lut_budget_s: float = knob(0.3, lo=0.0, lo_open=True, help="time budget per lookup-table op")

    def __post_init__(self) -> None:
        check_fields(self, "proxy")


@dataclass
class CostTerm:
    """One op of the model, as the proxy sees it.

    ``dims``: up to two widths, each a segment name (varies with the gates) or an int.
    ``flops``/``bytes``: at full width; they scale with the product of the dims' kept
    fractions (bytes: with their mean). ``op`` + ``spec`` say how to build the op alone for
    the lookup table: ``conv2d`` {batch, h, w, kernel, stride, padding}, ``linear``
    {tokens}, ``norm_act`` {batch, h, w} or {tokens}, ``attention`` {batch, seq, head_dim};
    ``conv2d``/``linear`` also take ``in_mult``/``out_mult`` (elements per unit of a dim).
    Grouped-query decoders: ``linear_heads`` {tokens, fixed, mult, side} (dims: query slots,
    KV groups), ``attention_gqa`` {batch, seq, head_dim} (causal prefill) and
    ``decode_attention`` {batch, ctx, head_dim} (one query token reading a KV cache of ``ctx``).
    Any op takes ``repeat`` (runs per call).

    ``scale``: a segment (a transformer layer's one-unit ``layer`` gate) whose kept fraction
    multiplies the term's FLOPs, bytes, live-op count and table time: a removed layer costs
    nothing, whatever its other widths. The table is timed without it (the op itself is the same).
    """

    name: str
    op: str
    dims: tuple
    flops: float
    bytes: float
    spec: dict = field(default_factory=dict)
    scale: str | None = None


def _build_op(
    op: str, spec: dict, widths: Sequence[int], dtype: torch.dtype = torch.float32
) -> tuple[Callable, tuple]:
    """A module (or function) of one op at the given widths, with an example input, in ``dtype``.

    ``spec["repeat"]`` > 1 runs the op that many times per call (e.g. the decode steps of a
    prefill + decode mix).
    """
    rep = int(spec.get("repeat", 1))
    if rep > 1:
        fn, args = _build_op(op, {k: v for k, v in spec.items() if k != "repeat"}, widths, dtype)

        def repeated(*a):
            for _ in range(rep):
                out = fn(*a)
            return out

        return repeated, args
    fn, args = _build_op_fp32(op, spec, widths)
    # the table times the op in the dtype the model computes in (bf16 and fp32 kernels differ)
    if isinstance(fn, nn.Module):
        fn = fn.to(dtype)
    return fn, tuple(a.to(dtype) for a in args)


def _build_op_fp32(op: str, spec: dict, widths: Sequence[int]) -> tuple[Callable, tuple]:
    # ``in_mult``/``out_mult``: elements per unit (e.g. head_dim when a dim counts heads).
    if op in ("conv2d", "linear"):
        widths = (widths[0] * spec.get("in_mult", 1), widths[1] * spec.get("out_mult", 1))
    if op == "conv2d":
        cin, cout = widths
        mod = nn.Conv2d(cin, cout, spec["kernel"], spec["stride"], spec["padding"], bias=False).eval()
        return mod, (torch.randn(spec["batch"], cin, spec["h"], spec["w"]),)
    if op == "linear":
        cin, cout = widths
        return nn.Linear(cin, cout).eval(), (torch.randn(spec["tokens"], cin),)
    if op == "norm_act":
        (c,) = widths
        if "tokens" in spec:
            return nn.Sequential(nn.LayerNorm(c), nn.GELU()).eval(), (torch.randn(spec["tokens"], c),)
        return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()).eval(), (
            torch.randn(spec["batch"], c, spec["h"], spec["w"]),
        )
    if op == "attention":
        (h,) = widths
        q = torch.randn(spec["batch"], h, spec["seq"], spec["head_dim"])
        return torch.nn.functional.scaled_dot_product_attention, (q, q.clone(), q.clone())
    if op == "linear_heads":
        # a projection to/from (slots x groups x mult) features, e.g. GQA q_proj / o_proj
        n = widths[0] * widths[1] * spec.get("mult", 1)
        fin, fout = (spec["fixed"], n) if spec.get("side", "out") == "out" else (n, spec["fixed"])
        return nn.Linear(fin, fout).eval(), (torch.randn(spec["tokens"], fin),)
    if op in ("attention_gqa", "decode_attention"):
        # widths (query heads per KV group, KV groups); decode: one query against a KV cache
        rep_, kv = widths
        q_len = spec["seq"] if op == "attention_gqa" else 1
        ctx = spec["seq"] if op == "attention_gqa" else spec["ctx"]
        q = torch.randn(spec["batch"], kv * rep_, q_len, spec["head_dim"])
        k = torch.randn(spec["batch"], kv, ctx, spec["head_dim"])

        def attn(q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=op == "attention_gqa", enable_gqa=True
            )

        return attn, (q, k, k.clone())
    raise ValueError(f"no lookup-table builder for op {op!r}")


def _time_op(
    op: str,
    spec: dict,
    widths: tuple[int, ...],
    device: str,
    repeats: int,
    budget_s: float,
    dtype: torch.dtype,
) -> float:
    """Median ms of one table op at ``widths`` on ``device`` in ``dtype``."""
    mod, inputs = _build_op(op, spec, widths, dtype)
    if isinstance(mod, nn.Module):
        mod = mod.to(device)
    return measure_latency_ms(
        mod,
        inputs,
        device=device,
        warmup=2,
        min_repeats=repeats,
        max_repeats=50,
        budget_s=budget_s,
        rel_ci=0.03,
        # hundreds of one-op programs: tracing each for the C++ loop costs more than it saves
        timer="python",
    ).median_ms


class LatencyProxy(nn.Module):
    """Latency in ms as a differentiable function of the kept widths ``[S]`` of a GateStore.

    Build with :meth:`from_terms`; fill the lookup table with :meth:`measure_table` (``lut``
    mode); fit with :meth:`calibrate` on measured sub-architectures.
    """

    def __init__(self, store: GateStore, terms: list[CostTerm], mode: str = "lut") -> None:
        super().__init__()
        if mode not in PROXY_MODES:
            raise ValueError(f"proxy mode {mode!r} is not one of {PROXY_MODES}")
        if not terms:
            raise ValueError("the latency proxy needs at least one cost term")
        self.mode = mode
        self.terms = terms
        self.seg_names = [s.name for s in store.segments]
        index = {s.name: i for i, s in enumerate(store.segments)}
        full_units = [float(s.units) for s in store.segments]
        S = len(full_units)
        idx, full = [], []
        for t in terms:
            if len(t.dims) > MAX_DIMS or not t.dims:
                raise ValueError(f"cost term {t.name!r} must have 1..{MAX_DIMS} dims, has {len(t.dims)}")
            row_i, row_f = [], []
            for d in t.dims:
                if isinstance(d, str):
                    if d not in index:
                        raise ValueError(f"cost term {t.name!r} names unknown segment {d!r}")
                    row_i.append(index[d])
                    row_f.append(full_units[index[d]])
                else:
                    row_i.append(S)  # the constant slot: kept fraction 1
                    row_f.append(float(d))
            while len(row_i) < MAX_DIMS:
                row_i.append(S)
                row_f.append(1.0)
            idx.append(row_i)
            full.append(row_f)
        scale = []
        for t in terms:
            if t.scale is not None and t.scale not in index:
                raise ValueError(f"cost term {t.name!r} is scaled by unknown segment {t.scale!r}")
            scale.append(S if t.scale is None else index[t.scale])
        self.register_buffer("dim_index", torch.tensor(idx, dtype=torch.long))  # [T, 2]
        # [T] the segment whose kept fraction multiplies each term (S: the constant slot, 1);
        # derived from the terms, so not part of a saved proxy state
        self.register_buffer("scale_index", torch.tensor(scale, dtype=torch.long), persistent=False)
        self.register_buffer("dim_full", torch.tensor(full))  # [T, 2]
        self.register_buffer("seg_full", torch.tensor(full_units + [1.0]))  # [S + 1]
        self.register_buffer("n_dims", torch.tensor([len(t.dims) for t in terms]))
        self.register_buffer("flops", torch.tensor([t.flops for t in terms], dtype=torch.float64).float())
        self.register_buffer("bytes_", torch.tensor([t.bytes for t in terms], dtype=torch.float64).float())
        self.register_buffer("grid", torch.tensor(GRID))  # [G] kept fractions the table aims at
        # [T, 2, G] the kept fraction each table entry was timed at, per term and dim: a grid
        # fraction g of a dim with n units times round(g * n) units, so the entry is filed at
        # round(g * n) / n, not at g (a 12-head dim at g = 1/8 times 2 heads, i.e. 1/6)
        self.register_buffer("grid_r", torch.tensor(GRID).repeat(len(terms), MAX_DIMS, 1))
        self.register_buffer("table", torch.zeros(len(terms), len(GRID), len(GRID)))  # [T, G, G] ms
        # analytic: [a_flops (per GFLOP), b_bytes (per MB), c_ops, intercept]; lut: [scale, 0, 0, intercept]
        self.register_buffer("coef", torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.calibration: list[dict] = []
        self.table_measured = False

    # ------------------------------------------------------------------ evaluation
    def fractions(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S] -> [T, 2]`` kept fraction of each term's dims (1 for fixed dims)."""
        return self._seg_fractions(widths)[self.dim_index]

    def _seg_fractions(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S] -> [S + 1]`` kept fraction of each segment, then the constant slot (1) that a
        fixed dim or an unscaled term indexes."""
        return torch.cat([widths.float() / self.seg_full[:-1], widths.new_ones(1, dtype=torch.float32)])

    def scales(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S] -> [T]`` kept fraction of each term's ``scale`` segment (1 for unscaled terms)."""
        return self._seg_fractions(widths)[self.scale_index]

    def features(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S] -> [4]``: (GFLOPs, MB, live ops, 1) of the sub-architecture."""
        r = self.fractions(widths)
        s = self.scales(widths)
        prod = r.prod(-1)
        mean = (r.sum(-1) - (MAX_DIMS - self.n_dims)) / self.n_dims
        live = (r > 0).all(-1).float()
        return torch.stack(
            [
                (self.flops * prod * s).sum() / 1e9,
                (self.bytes_ * mean * live * s).sum() / 1e6,
                (live * s).sum(),
                prod.new_ones(()),
            ]
        )

    def term_ms(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S] -> [T]``: table-interpolated latency of each term (lut mode), piecewise linear
        between the widths that were timed (``grid_r``), times the term's ``scale`` fraction."""
        r = self.fractions(widths).clamp(0.0, 1.0)  # [T, 2]
        G = self.grid.numel()
        grid = self.grid_r  # [T, 2, G], non-decreasing along G
        hi = torch.searchsorted(grid, r.detach().unsqueeze(-1).contiguous()).squeeze(-1).clamp(1, G - 1)
        lo = hi - 1
        g_lo = grid.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
        g_hi = grid.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
        # a small dim times the same width at neighbouring grid points (equal entries): any t works
        t = ((r - g_lo) / (g_hi - g_lo).clamp_min(1e-12)).clamp(0.0, 1.0)  # [T, 2]
        rows = torch.arange(r.shape[0], device=r.device)
        out = 0.0
        for a, b in itertools.product((0, 1), (0, 1)):
            i = hi[:, 0] if a else lo[:, 0]
            j = hi[:, 1] if b else lo[:, 1]
            w = (t[:, 0] if a else 1 - t[:, 0]) * (t[:, 1] if b else 1 - t[:, 1])
            out = out + w * self.table[rows, i, j]
        return out * self.scales(widths)

    def forward(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S]`` kept units per segment -> scalar latency in ms (differentiable)."""
        if self.mode == "lut":
            return self.coef[0] * self.term_ms(widths).sum() + self.coef[3]
        return (self.coef * self.features(widths)).sum()

    def unit_costs(self) -> torch.Tensor:
        """``[S]`` marginal latency of one unit of each segment, averaged over the kept
        fractions 1/4, 1/2, 3/4 and 1 of the whole model and normalised so that the mean cost
        per unit (over all units) is 1: the weights of the cost-weighted L0 penalty."""
        full = self.seg_full[:-1].detach()
        grads = []
        for frac in (0.25, 0.5, 0.75, 1.0):
            w = (full * frac).requires_grad_(True)
            (g,) = torch.autograd.grad(self(w), w)
            grads.append(g)
        g = torch.stack(grads).mean(0).clamp(min=0.0)
        total = (g * full).sum()
        if not total > 0:
            return torch.ones_like(full)
        return g * full.sum() / total

    def raw(self, widths: torch.Tensor) -> torch.Tensor:
        """``[S] -> [k]`` the uncalibrated regressors of the current mode."""
        if self.mode == "lut":
            return torch.stack([self.term_ms(widths).sum(), widths.new_ones((), dtype=torch.float32)])
        return self.features(widths)

    # ------------------------------------------------------------------ lookup table
    def measure_table(
        self,
        device: str = "cpu",
        repeats: int = 5,
        budget_s: float = 0.3,
        progress: Callable[[int, int], None] | None = None,
        dtype: torch.dtype = torch.float32,
        time_op: Callable[[str, dict, tuple[int, ...]], float] | None = None,
    ) -> int:
        """Measure every term's op at the grid of widths on ``device`` in ``dtype`` (the model's
        parameter dtype); returns ops timed.

        Identical (op, spec, widths) are timed once. A zero width costs zero. ``time_op(op, spec,
        widths) -> ms`` replaces the measurement (default: build the op and time it on ``device``).
        """
        cache: dict[tuple, float] = {}
        jobs = []
        for ti, t in enumerate(self.terms):
            fulls = [int(self.dim_full[ti, d]) for d in range(len(t.dims))]
            axes = [
                range(len(GRID)) if isinstance(t.dims[d], str) else [len(GRID) - 1]
                for d in range(len(t.dims))
            ]
            for gi in itertools.product(*axes):
                w = tuple(max(0, int(round(GRID[g] * f))) for g, f in zip(gi, fulls))
                jobs.append((ti, gi, w))
        todo = {
            (self.terms[ti].op, tuple(sorted(self.terms[ti].spec.items())), w)
            for ti, _, w in jobs
            if min(w) > 0
        }
        done = 0
        for key in sorted(todo, key=str):
            op, spec, w = key
            if time_op is not None:
                cache[key] = float(time_op(op, dict(spec), w))
            else:
                cache[key] = _time_op(op, dict(spec), w, device, repeats, budget_s, dtype)
            done += 1
            if progress:
                progress(done, len(todo))
        table = torch.zeros_like(self.table)
        grid_r = self.grid.detach().cpu().repeat(len(self.terms), MAX_DIMS, 1)
        for ti, gi, w in jobs:
            for d, (g, width) in enumerate(zip(gi, w)):
                if isinstance(self.terms[ti].dims[d], str):  # file the entry at the width timed
                    grid_r[ti, d, g] = width / float(self.dim_full[ti, d])
            t = self.terms[ti]
            v = 0.0 if min(w) == 0 else cache[(t.op, tuple(sorted(t.spec.items())), w)]
            if len(t.dims) == 1:
                table[ti, gi[0], :] = v
            else:
                table[ti, gi[0], gi[1]] = v
        self.table.copy_(table)
        self.grid_r.copy_(grid_r)
        self.table_measured = True
        return done

    # ------------------------------------------------------------------ calibration
    def calibrate(self, widths: Sequence[torch.Tensor], measured_ms: Sequence[float]) -> dict:
        """Fit the mode's coefficients on measured sub-architectures (>= 2; several advised).

        Non-negative least squares over all subsets of the regressors (there are at most
        four), so the fitted latency never decreases when a width grows. Returns the fit.
        """
        if len(widths) != len(measured_ms) or len(widths) < 2:
            raise ValueError("calibration needs at least two measured sub-architectures")
        if self.mode == "lut" and not self.table_measured:
            raise ValueError("lut proxy: call measure_table() before calibrate()")
        with torch.no_grad():
            X = torch.stack([self.raw(w.to(self.grid.device)) for w in widths]).double().cpu()  # [P, k]
        y = torch.tensor(list(measured_ms), dtype=torch.float64)
        k = X.shape[1]
        best = None
        for r in range(1, k + 1):
            for cols in itertools.combinations(range(k), r):
                sub = X[:, list(cols)]
                sol = torch.linalg.lstsq(sub, y.unsqueeze(1)).solution.squeeze(1)
                if (sol < 0).any():
                    continue
                resid = float(((sub @ sol - y) ** 2).sum())
                if best is None or resid < best[0] - 1e-12:
                    best = (resid, cols, sol)
        coef = torch.zeros(k, dtype=torch.float64)
        if best is None:  # no feasible fit: a pure scale on the first regressor
            coef[0] = float((X[:, 0] @ y) / (X[:, 0] @ X[:, 0]).clamp_min(1e-30))
        else:
            coef[list(best[1])] = best[2]
        if self.mode == "lut":
            self.coef.copy_(torch.tensor([float(coef[0]), 0.0, 0.0, float(coef[1])]))
        else:
            self.coef.copy_(coef.float())
        pred = (X @ coef).tolist()
        self.calibration = [
            {"measured_ms": float(m), "predicted_ms": float(p)} for m, p in zip(measured_ms, pred)
        ]
        return {"coef": self.coef.tolist(), "points": self.calibration, "mape": mape(pred, list(measured_ms))}

    def add_point_and_refit(self, widths: torch.Tensor, measured_ms: float, history: list) -> dict:
        """Append one real measurement to ``history`` (list of (widths, ms)) and refit on all."""
        history.append((widths.detach().float().cpu(), float(measured_ms)))
        ws, ms = zip(*history)
        return self.calibrate(list(ws), list(ms))


def mape(pred: Sequence[float], true: Sequence[float]) -> float:
    """Mean absolute percentage error, in percent."""
    return 100.0 * sum(abs(p - t) / max(abs(t), 1e-12) for p, t in zip(pred, true)) / max(len(true), 1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else 0.0


@torch.no_grad()
def set_random_keep(store: GateStore, generator: torch.Generator, lo: float = 0.15, hi: float = 1.0) -> None:
    """Set logits so each segment keeps a random fraction in [lo, hi] of its gates (random which).

    Segments that must keep gates open keep at least their ``min_keep``.
    """
    logits = torch.empty(len(store))
    for s in store.segments:
        frac = lo + (hi - lo) * float(torch.rand((), generator=generator))
        k = max(s.min_keep, 1, int(round(frac * s.count)))
        score = torch.rand(s.count, generator=generator)
        order = torch.argsort(score, descending=True)
        seg = torch.full((s.count,), -1.0)
        seg[order[:k]] = 1.0
        logits[s.start : s.stop] = seg * (1.0 + score)
    store.logits.copy_(logits.to(store.logits))


@torch.no_grad()
def set_uniform_keep(store: GateStore, frac: float) -> None:
    """Set logits so every segment keeps its top ``frac`` of gates (by current logit order)."""
    new = store.logits.detach().clone()
    for s in store.segments:
        k = max(s.min_keep, 1, int(round(frac * s.count)))
        base = torch.linspace(1.0, 0.0, s.count)
        seg = torch.where(torch.arange(s.count) < k, 1.0 + base, -1.0 - base)
        new[s.start : s.stop] = seg.to(new)
    store.logits.copy_(new)
