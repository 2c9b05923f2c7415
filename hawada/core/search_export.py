"""Choose the export rounding by measured latency on the target device."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hawada.core.export import (
    ExportPolicy,
    Rounding,
    keep_counts,
    keep_indices,
    kept_gate_mass,
    param_count,
    store_of,
)
from hawada.core.export import export as export_model
from hawada.core.profiler import Meter


@dataclass
class SearchResult:
    """Every trial of the grid, and the one chosen."""

    policy: ExportPolicy
    best: dict
    trials: list[dict] = field(default_factory=list)
    met_target: bool = True


def grid_search_latency(
    gated: nn.Module,
    target_ms: float,
    meter: Meter,
    multiples: Sequence[int] = (1, 4, 8, 16, 32),
    modes: Sequence[str] = ("floor", "nearest", "ceil"),
    kinds: Sequence[str] | None = None,
    fill_probes: int = 0,
) -> SearchResult:
    """Export and measure EVERY (multiple, mode) combination; pick the best.

    Best = among trials whose measured median is within ``target_ms``, the one that keeps the
    most gate probability mass (ties: the faster); when none is within target, the fastest.
    ``meter(model)`` measures one exported model on the target (see ``latency_meter``).
    ``kinds``: the segment kinds the rounding applies to (default: all).
    ``fill_probes`` > 0: then reopen closed gates while the export stays within target
    (:func:`fill_to_target`, that many measured exports); its trials are recorded as mode ``fill``.
    """
    store = store_of(gated)
    trials: list[dict] = []
    for multiple, mode in itertools.product(multiples, modes):
        r = Rounding(int(multiple), mode)
        policy = ExportPolicy(
            rounding=None, per_kind={k: r for k in (kinds or {s.kind for s in store.segments})}
        )
        keep = keep_indices(store, policy)
        slim = export_model(gated, policy)
        res = meter(slim)
        trials.append(
            {
                "multiple": int(multiple),
                "mode": mode,
                "median_ms": res.median_ms,
                "spread_ms": res.spread_ms,
                "n": res.n,
                "gate_mass": kept_gate_mass(store, keep),
                "params": param_count(slim),
                "within_target": res.median_ms <= target_ms,
                "_policy": policy,
            }
        )
    best, met = choose_trial(trials)
    if fill_probes > 0 and met:
        fills = fill_to_target(gated, best["_policy"], target_ms, meter, fill_probes)
        trials += fills
        best, met = choose_trial(trials)
    clean = [{k: v for k, v in t.items() if k != "_policy"} for t in trials]
    return SearchResult(best["_policy"], {k: v for k, v in best.items() if k != "_policy"}, clean, met)


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


def fill_to_target(
    gated: nn.Module, policy: ExportPolicy, target_ms: float, meter: Meter, probes: int
) -> list[dict]:
    """Trials of ``policy`` plus the ``n`` closed gates with the highest logits, ``n`` found by a
    binary search of ``probes`` measured exports for the largest ``n`` within ``target_ms``.

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
        counts = dict(base)
        for name, k in cands[:n]:
            counts[name] = max(counts[name], k)
        trial_policy = ExportPolicy(check=policy.check, tolerance=policy.tolerance, counts=counts)
        keep = keep_indices(store, trial_policy)
        slim = export_model(gated, trial_policy)
        res = meter(slim)
        ok = res.median_ms <= target_ms
        trials.append(
            {
                "multiple": 1,
                "mode": "fill",
                "reopened": n,
                "median_ms": res.median_ms,
                "spread_ms": res.spread_ms,
                "n": res.n,
                "gate_mass": kept_gate_mass(store, keep),
                "params": param_count(slim),
                "within_target": ok,
                "_policy": trial_policy,
            }
        )
        lo, hi = (n, hi) if ok else (lo, n - 1)
    return trials


def choose_trial(trials: list[dict]) -> tuple[dict, bool]:
    """(best trial, whether it meets the target): among trials within target the one keeping the
    most gate mass (ties: faster); when none is within target, the fastest."""
    if not trials:
        raise ValueError("grid search needs at least one (multiple, mode) combination")
    within = [t for t in trials if t["within_target"]]
    if within:
        return max(within, key=lambda t: (round(t["gate_mass"], 9), -t["median_ms"])), True
    return min(trials, key=lambda t: t["median_ms"]), False
