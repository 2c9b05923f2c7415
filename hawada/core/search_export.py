"""Choose the export rounding by measured latency on the target device."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from hawada.core.export import ExportPolicy, Rounding, keep_indices, kept_gate_mass, param_count, store_of
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
) -> SearchResult:
    """Export and measure EVERY (multiple, mode) combination; pick the best.

    Best = among trials whose measured median is within ``target_ms``, the one that keeps the
    most gate probability mass (ties: the faster); when none is within target, the fastest.
    ``meter(model)`` measures one exported model on the target (see ``latency_meter``).
    ``kinds``: the segment kinds the rounding applies to (default: all).
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
    clean = [{k: v for k, v in t.items() if k != "_policy"} for t in trials]
    return SearchResult(best["_policy"], {k: v for k, v in best.items() if k != "_policy"}, clean, met)


def choose_trial(trials: list[dict]) -> tuple[dict, bool]:
    """(best trial, whether it meets the target): among trials within target the one keeping the
    most gate mass (ties: faster); when none is within target, the fastest."""
    if not trials:
        raise ValueError("grid search needs at least one (multiple, mode) combination")
    within = [t for t in trials if t["within_target"]]
    if within:
        return max(within, key=lambda t: (round(t["gate_mass"], 9), -t["median_ms"])), True
    return min(trials, key=lambda t: t["median_ms"]), False
