"""Choose the export by measured latency on the target device: a grid of roundings, then a
binary search that reopens (fill) or closes (trim) gates in logit order."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hawada.core.export import (
    ExportPolicy,
    Rounding,
    RoundMode,
    keep_counts,
    keep_indices,
    kept_gate_mass,
    param_count,
    store_of,
)
from hawada.core.export import export as export_model
from hawada.core.profiler import LatencyResult, Meter, measure_pooled
from hawada.core.schema import check_fields, knob
from hawada.errors import InputError


@dataclass
class SearchConfig:
    """The recipe's ``search`` section: which roundings to measure, and the fill/trim probes."""

    multiples: list[int] = knob(factory=lambda: [1, 4, 8, 16], lo=1)
    modes: list[RoundMode] = knob(factory=lambda: ["floor", "nearest", "ceil"])
    kinds: list[str] | None = knob(None, help="segment kinds the rounding applies to; null: every kind")
    fill_probes: int = knob(
        0,
        lo=0,
        help="measured exports after the grid: reopen closed gates while within target, or close "
        "open ones until within it; 0: off",
    )

    def __post_init__(self) -> None:
        check_fields(self, "search")


@dataclass
class SearchResult:
    """Every trial of the grid, and the one chosen."""

    policy: ExportPolicy
    best: dict
    trials: list[dict] = field(default_factory=list)
    met_target: bool = True


class Judge:
    """Measures one export and says whether it is within target.

    Without ``reference``: one ``meter`` call, within target when its median is <= ``target_ms``.
    With ``reference`` (the keep-all model) and ``ratio``: the reference and the export are
    measured back to back, and the export is within target when its median is <= ``ratio`` x
    the reference's; load that comes and goes on the machine then moves both sides alike.
    """

    def __init__(
        self, target_ms: float, meter: Meter, reference: nn.Module | None = None, ratio: float | None = None
    ) -> None:
        if (reference is None) != (ratio is None):
            raise ValueError("a reference model and a target ratio go together")
        self.target_ms, self.meter, self.reference, self.ratio = target_ms, meter, reference, ratio

    def __call__(self, slim: nn.Module) -> tuple[LatencyResult, bool, dict]:
        """(the export's latency, within target, fields to add to the trial)."""
        if self.reference is None:
            res = self.meter(slim)
            return res, res.median_ms <= self.target_ms, {}
        ref, res = measure_pooled([self.reference, slim], self.meter, rounds=1)
        limit = float(self.ratio) * ref.median_ms
        return res, res.median_ms <= limit, {"reference_ms": ref.median_ms, "limit_ms": limit}


def grid_search_latency(
    gated: nn.Module,
    target_ms: float,
    meter: Meter,
    multiples: Sequence[int] | None = None,
    modes: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    reference: nn.Module | None = None,
    ratio: float | None = None,
) -> SearchResult:
    """Export and measure EVERY (multiple, mode) rounding; pick the best.

    ``multiples`` / ``modes`` default to :class:`SearchConfig`'s.

    Best = among trials within target, the one that keeps the most gate probability mass (ties:
    the faster); when none is within target, the fastest. ``meter(model)`` measures one exported
    model on the target (see ``latency_meter``). Within target: median <= ``target_ms``, or, with
    ``reference`` and ``ratio``, median <= ``ratio`` x the reference measured just before it
    (:class:`Judge`). ``kinds``: the segment kinds the rounding applies to (default: all).
    """
    d = SearchConfig()
    judge = Judge(target_ms, meter, reference, ratio)
    return _result(_grid_trials(gated, judge, multiples or d.multiples, modes or d.modes, kinds))


def search_export(
    gated: nn.Module,
    target_ms: float,
    meter: Meter,
    config: SearchConfig | None = None,
    reference: nn.Module | None = None,
    ratio: float | None = None,
) -> SearchResult:
    """The grid of :func:`grid_search_latency` over ``config``'s roundings, then the fill/trim probes.

    ``config.fill_probes`` > 0: when the best grid trial is within target, reopen closed gates
    while the export stays within it (:func:`fill_to_target`, mode ``fill``); when none is, close
    the open gates with the lowest logits until one is (:func:`trim_to_target`, mode ``trim``);
    at most that many measured exports either way. The best of all trials is chosen as in the grid.
    """
    cfg = config or SearchConfig()
    judge = Judge(target_ms, meter, reference, ratio)
    trials = _grid_trials(gated, judge, cfg.multiples, cfg.modes, cfg.kinds)
    if cfg.fill_probes > 0:
        best, met = choose_trial(trials)
        step = fill_to_target if met else trim_to_target
        trials += step(gated, best["_policy"], judge, cfg.fill_probes)
    return _result(trials)


def _grid_trials(
    gated: nn.Module,
    judge: Judge,
    multiples: Sequence[int],
    modes: Sequence[str],
    kinds: Sequence[str] | None,
) -> list[dict]:
    store = store_of(gated)
    kinds = kinds or sorted({s.kind for s in store.segments})
    trials = []
    for multiple, mode in itertools.product(multiples, modes):
        r = Rounding(int(multiple), mode)
        policy = ExportPolicy(rounding=None, per_kind={k: r for k in kinds})
        trials.append(_trial(gated, policy, judge, {"multiple": int(multiple), "mode": mode}))
    return trials


def _result(trials: list[dict]) -> SearchResult:
    """The chosen trial's policy, and every trial without its policy object."""
    best, met = choose_trial(trials)
    clean = [{k: v for k, v in t.items() if k != "_policy"} for t in trials]
    return SearchResult(best["_policy"], {k: v for k, v in best.items() if k != "_policy"}, clean, met)


def _trial(gated: nn.Module, policy: ExportPolicy, judge: Judge, fields: dict) -> dict:
    """Export ``gated`` under ``policy``, measure it, and describe it as a trial."""
    store = store_of(gated)
    keep = keep_indices(store, policy)
    slim = export_model(gated, policy)
    res, ok, extra = judge(slim)
    return {
        **fields,
        "median_ms": res.median_ms,
        "spread_ms": res.spread_ms,
        "n": res.n,
        **extra,
        "gate_mass": kept_gate_mass(store, keep),
        "params": param_count(slim),
        "within_target": ok,
        "_policy": policy,
    }


def closed_gates_by_logit(store, counts: dict[str, int]) -> list[tuple[str, int]]:
    """The gates a keep set leaves out, as ``(segment name, count once reopened)``, highest logit
    first over all segments; a segment's entries are in its own logit order, so reopening the
    first ``n`` entries is the keep set with each segment's count raised to its last entry."""
    lg = store.logits.detach().cpu()
    cands: list[tuple[float, str, int]] = []
    for s in store.segments:
        kept_groups = -(-int(counts[s.name]) // s.group_size)  # a split group counts as kept
        order = torch.sort(lg[s.start : s.stop], descending=True, stable=True).values
        for j in range(kept_groups, s.count):
            cands.append((float(order[j]), s.name, min(s.units, (j + 1) * s.group_size)))
    cands.sort(key=lambda c: -c[0])  # stable: a segment's own order is kept among equal logits
    return [(name, k) for _, name, k in cands]


def open_gates_by_logit(store, counts: dict[str, int]) -> list[tuple[str, int]]:
    """The gates a keep set holds above each segment's ``min_keep``, as ``(segment name, count
    once closed)``, lowest logit first over all segments; a segment's entries are in its own
    reverse logit order, so closing the first ``n`` entries is the keep set with each segment's
    count lowered to its last entry."""
    lg = store.logits.detach().cpu()
    cands: list[tuple[float, str, int]] = []
    for s in store.segments:
        kept_groups = -(-int(counts[s.name]) // s.group_size)
        order = torch.sort(lg[s.start : s.stop], descending=True, stable=True).values
        for j in range(kept_groups - 1, s.min_keep - 1, -1):
            cands.append((float(order[j]), s.name, min(s.units, j * s.group_size)))
    cands.sort(key=lambda c: c[0])  # stable: a segment's own order is kept among equal logits
    return [(name, k) for _, name, k in cands]


def fill_to_target(gated: nn.Module, policy: ExportPolicy, judge: Judge, probes: int) -> list[dict]:
    """Trials of ``policy`` plus the ``n`` closed gates with the highest logits, ``n`` found by a
    binary search of ``probes`` measured exports for the largest ``n`` within target.

    Gate training lands below the target when its proxy over-predicts the latency of small
    models; measured exports give that margin back as capacity. Every trial is returned
    (``mode`` ``fill``, ``reopened`` = n), each with its policy under ``_policy``.
    """
    store = store_of(gated)
    base = keep_counts(store, policy)
    cands = closed_gates_by_logit(store, base)
    trials: list[dict] = []
    lo, hi = 0, len(cands)  # lo: the most reopened gates known within target
    for _ in range(probes):
        if lo >= hi:
            break
        n = (lo + hi + 1) // 2
        t = _trial(
            gated, _moved(policy, base, cands[:n], max), judge, {"multiple": 1, "mode": "fill", "reopened": n}
        )
        trials.append(t)
        lo, hi = (n, hi) if t["within_target"] else (lo, n - 1)
    return trials


def trim_to_target(gated: nn.Module, policy: ExportPolicy, judge: Judge, probes: int) -> list[dict]:
    """Trials of ``policy`` less the ``n`` open gates with the lowest logits (never below a
    segment's ``min_keep``), ``n`` found by a binary search of ``probes`` measured exports for the
    smallest ``n`` within target.

    Gate training lands above the target when its proxy under-predicts, or when the machine ran
    slower while the target was set. Every trial is returned (``mode`` ``trim``, ``closed`` = n),
    each with its policy under ``_policy``.
    """
    store = store_of(gated)
    base = keep_counts(store, policy)
    cands = open_gates_by_logit(store, base)
    trials: list[dict] = []
    lo, hi, hi_ok = 0, len(cands), False  # lo: known over target; hi: the fewest that may be within
    for _ in range(probes):
        if lo >= hi or (hi_ok and hi - lo <= 1):
            break
        n = (lo + hi + 1) // 2  # in (lo, hi]
        t = _trial(
            gated, _moved(policy, base, cands[:n], min), judge, {"multiple": 1, "mode": "trim", "closed": n}
        )
        trials.append(t)
        if t["within_target"]:
            hi, hi_ok = n, True
        else:
            lo = n
    return trials


def _moved(policy: ExportPolicy, base: dict[str, int], moves: list[tuple[str, int]], pick) -> ExportPolicy:
    """``policy`` as explicit counts: ``base`` with each move ``(segment, count)`` applied by ``pick``
    (``max`` reopens, ``min`` closes)."""
    counts = dict(base)
    for name, k in moves:
        counts[name] = pick(counts[name], k)
    return ExportPolicy(check=policy.check, tolerance=policy.tolerance, counts=counts)


def choose_trial(trials: list[dict]) -> tuple[dict, bool]:
    """(best trial, whether it meets the target): among trials within target the one keeping the
    most gate mass (ties: faster); when none is within target, the fastest."""
    if not trials:
        raise InputError("grid search needs at least one (multiple, mode) combination")
    within = [t for t in trials if t["within_target"]]
    if within:
        return max(within, key=lambda t: (round(t["gate_mass"], 9), -t["median_ms"])), True
    return min(trials, key=lambda t: t["median_ms"]), False
