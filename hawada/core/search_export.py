"""Choose the export by measured latency on the target device: a grid of roundings, then a
binary search that reopens (fill) or closes (trim) gates in logit order, then the best few
re-timed interleaved with keep-all and held to the target with a margin for their spread."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
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
from hawada.core.profiler import LatencyResult, Meter, measure_pooled, ratio_ci
from hawada.core.schema import check_fields, knob
from hawada.errors import InputError


@dataclass
class SearchConfig:
    """The recipe's ``search`` section: which roundings to measure, the fill/trim probes, and
    the finalists re-timed before one is chosen.

    ``kinds`` is the recipe's and not a per-family default of the adapter: which widths a multiple
    speeds up depends on the device and runtime (a GPU GEMM wants an FFN width in multiples of
    64, while 4 query slots per KV group are not a GEMM dimension at all), and a recipe targets
    one device. A multiple no smaller than a segment leaves that segment unrounded
    (:meth:`Rounding.apply`), so listing every kind never reopens small segments whole. Layer
    gates (kind ``layer``) are never rounded: the default leaves them out and listing them is
    refused.
    """

    multiples: list[int] = knob(factory=lambda: [1, 4, 8, 16], lo=1)
    modes: list[RoundMode] = knob(factory=lambda: ["floor", "nearest", "ceil"])
    kinds: list[str] | None = knob(None, help="segment kinds the rounding applies to; null: every kind")
    fill_probes: int = knob(
        0,
        lo=0,
        help="measured exports after the grid: reopen closed gates while within target, or close "
        "open ones until within it; 0: off",
    )
    finalists: int = knob(
        3,
        lo=1,
        help="the best trials within target (and the fastest one) re-timed interleaved with "
        "keep-all; the chosen one is the best whose 95% interval is within the target",
    )
    confirm_rounds: int = knob(3, lo=1, help="interleaved rounds of that re-timing (each a full measurement)")

    def __post_init__(self) -> None:
        check_fields(self, "search")


@dataclass
class SearchResult:
    """Every trial (each timed once), the finalists (re-timed together), and the one chosen.

    ``best`` is the chosen finalist (see :func:`confirm_finalists`) and ``policy`` the policy
    of the model it timed; ``met_target``: its interval was within the target; ``fallback``:
    why the choice is not a finalist that passed, or None.
    """

    policy: ExportPolicy
    best: dict
    trials: list[dict] = field(default_factory=list)
    met_target: bool = True
    finalists: list[dict] = field(default_factory=list)
    fallback: str | None = None


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

    def confirm(self, slims: list[nn.Module], rounds: int) -> list[dict]:
        """Time ``slims`` together, interleaved (with the reference first in each round, when
        there is one), ``rounds`` measurements each; per model, its timing and whether the upper
        end of the 95% bootstrap interval of ``median / reference median`` (or of
        ``median / target_ms``) is within the target ratio (1 for an absolute target)."""
        models = ([self.reference] if self.reference is not None else []) + list(slims)
        timed = measure_pooled(models, self.meter, rounds=rounds)
        ref = timed.pop(0) if self.reference is not None else None
        target_ratio = float(self.ratio) if self.ratio is not None else 1.0
        out = []
        for res in timed:
            den = ref if ref is not None else float(self.target_ms)
            base_ms = ref.median_ms if ref is not None else float(self.target_ms)
            lo, hi = ratio_ci(res, den)
            out.append(
                {
                    "median_ms": res.median_ms,
                    "spread_ms": res.spread_ms,
                    "n": res.n,
                    "reference_ms": ref.median_ms if ref is not None else None,
                    "limit_ms": target_ratio * base_ms,
                    "ratio": res.median_ms / base_ms,
                    "ratio_ci": [lo, hi],
                    "target_ratio": target_ratio,
                    "within_target": hi <= target_ratio,
                }
            )
        return out


def grid_search_latency(
    gated: nn.Module,
    target_ms: float,
    meter: Meter,
    multiples: Sequence[int] | None = None,
    modes: Sequence[str] | None = None,
    kinds: Sequence[str] | None = None,
    reference: nn.Module | None = None,
    ratio: float | None = None,
    finalists: int | None = None,
) -> SearchResult:
    """Export and measure EVERY (multiple, mode) rounding; pick the best.

    ``multiples`` / ``modes`` / ``finalists`` default to :class:`SearchConfig`'s.

    Best = among trials within target, the one that keeps the most gate probability mass (ties:
    the faster); when none is within target, the fastest. ``meter(model)`` measures one exported
    model on the target (see ``latency_meter``). Within target: median <= ``target_ms``, or, with
    ``reference`` and ``ratio``, median <= ``ratio`` x the reference measured just before it
    (:class:`Judge`). ``kinds``: the segment kinds the rounding applies to (default: all). The
    best few are then re-timed and held to the target with a margin (:func:`confirm_finalists`).
    """
    d = SearchConfig()
    cfg = SearchConfig(
        multiples=list(multiples or d.multiples),
        modes=list(modes or d.modes),
        kinds=list(kinds) if kinds else None,
        finalists=finalists or d.finalists,
    )
    return search_export(gated, target_ms, meter, cfg, reference=reference, ratio=ratio)


def search_export(
    gated: nn.Module,
    target_ms: float,
    meter: Meter,
    config: SearchConfig | None = None,
    reference: nn.Module | None = None,
    ratio: float | None = None,
    ship: Callable[[ExportPolicy], ExportPolicy] | None = None,
) -> SearchResult:
    """The grid of :func:`grid_search_latency` over ``config``'s roundings, the fill/trim probes,
    then the finalists.

    ``config.fill_probes`` > 0: when the best grid trial is within target, reopen closed gates
    while the export stays within it (:func:`fill_to_target`, mode ``fill``); when none is, close
    the open gates with the lowest logits until one is (:func:`trim_to_target`, mode ``trim``);
    at most that many measured exports either way. Each trial is timed once; the best few are
    then re-timed together and the choice is made on those timings (:func:`confirm_finalists`).
    ``ship(policy)``: the policy of the model that will be shipped for a trial's policy (e.g. a
    uniform layout); the finalists are timed as shipped, so the result describes that model.
    """
    cfg = config or SearchConfig()
    judge = Judge(target_ms, meter, reference, ratio)
    trials = _grid_trials(gated, judge, cfg.multiples, cfg.modes, cfg.kinds)
    if cfg.fill_probes > 0:
        best, met = choose_trial(trials)
        step = fill_to_target if met else trim_to_target
        trials += step(gated, best["_policy"], judge, cfg.fill_probes)
    return confirm_finalists(gated, trials, judge, cfg.finalists, cfg.confirm_rounds, ship)


def _grid_trials(
    gated: nn.Module,
    judge: Judge,
    multiples: Sequence[int],
    modes: Sequence[str],
    kinds: Sequence[str] | None,
) -> list[dict]:
    store = store_of(gated)
    present = sorted({s.kind for s in store.segments})
    unknown = sorted(set(kinds or ()) - set(present))
    if unknown:
        raise InputError(f"search.kinds: {unknown} are not gate kinds of this model (its kinds: {present})")
    if "layer" in (kinds or ()):
        raise InputError("search.kinds: 'layer' gates are never rounded (a layer is kept or removed whole)")
    kinds = kinds or [k for k in present if k != "layer"]
    trials = []
    for multiple, mode in itertools.product(multiples, modes):
        r = Rounding(int(multiple), mode)
        # kinds not listed are kept as the gates chose (no rounding), not rounded by a default
        policy = ExportPolicy(rounding=None, per_kind={k: r for k in kinds})
        trials.append(_trial(gated, policy, judge, {"multiple": int(multiple), "mode": mode}))
    return trials


def _criterion(t: dict) -> tuple[float, float]:
    """The search's order of preference among trials within target: the most gate mass kept,
    then the faster (larger is better)."""
    return (round(t["gate_mass"], 9), -t["median_ms"])


def confirm_finalists(
    gated: nn.Module,
    trials: list[dict],
    judge: Judge,
    count: int,
    rounds: int,
    ship: Callable[[ExportPolicy], ExportPolicy] | None = None,
) -> SearchResult:
    """Re-time the best trials together and choose among them with a margin for the spread.

    One timing per trial cannot tell apart exports a few percent apart: keep-all's median
    drifts more than that from one trial to the next, so a search that chooses on single
    timings chooses noise near the limit. The finalists are the ``count`` best trials within
    target (by :func:`choose_trial`'s order) and the fastest trial within target (the one with
    the most margin), or, when none is within target, the fastest trial. They are exported (as
    ``ship`` turns their policies, when given) and timed interleaved with keep-all over
    ``rounds`` rounds (:meth:`Judge.confirm`); a finalist passes when the upper end of its
    ratio's 95% bootstrap interval is within the target ratio. The chosen one is the best that
    passes; when none passes, the one whose upper end is lowest, and ``fallback`` says so.

    Each finalist entry: the trial's index (``trial``) and how it was found (``multiple``,
    ``mode``, ``reopened`` / ``closed``), then the re-timed model's ``median_ms``, ``spread_ms``,
    ``n``, ``reference_ms``, ``limit_ms``, ``ratio``, ``ratio_ci``, ``target_ratio``,
    ``gate_mass``, ``params`` and ``within_target`` (it passed).
    """
    if not trials:
        raise InputError("grid search needs at least one (multiple, mode) combination")
    idx = {id(t): i for i, t in enumerate(trials)}
    within = sorted((t for t in trials if t["within_target"]), key=_criterion, reverse=True)
    if within:
        picks = within[:count]
        fastest = min(within, key=lambda t: t["median_ms"])
        if all(p is not fastest for p in picks):
            picks.append(fastest)
    else:
        picks = [min(trials, key=lambda t: t["median_ms"])]
    store = store_of(gated)
    policies = [ship(t["_policy"]) if ship else t["_policy"] for t in picks]
    slims = [export_model(gated, p) for p in policies]
    timed = judge.confirm(slims, rounds)
    finalists = []
    for t, policy, slim, tm in zip(picks, policies, slims, timed):
        how = {k: t[k] for k in ("multiple", "mode", "reopened", "closed") if k in t}
        mass = kept_gate_mass(store, keep_indices(store, policy))
        finalists.append(
            {
                "trial": idx[id(t)],
                **how,
                **tm,
                "gate_mass": mass,
                "params": param_count(slim),
                "_policy": policy,
            }
        )
    passed = [f for f in finalists if f["within_target"]]
    fallback = None
    if passed:
        best = passed[0]  # finalists are in the search's order of preference
    else:
        best = min(finalists, key=lambda f: f["ratio_ci"][1])
        if within:
            why = f"none of the {len(finalists)} finalists re-timed interleaved is within target with its 95% interval"
        else:
            why = "no trial was within target on its single timing"
        fallback = (
            f"{why}: chose the finalist with the lowest upper end, ratio {best['ratio']:.3f} "
            f"(95% {best['ratio_ci'][0]:.3f}-{best['ratio_ci'][1]:.3f}) against {best['target_ratio']:g}"
        )
    return SearchResult(
        best["_policy"],
        _public(best),
        [_public(t) for t in trials],
        bool(passed),
        [_public(f) for f in finalists],
        fallback,
    )


def _public(d: dict) -> dict:
    """A trial without its policy object (what goes into report.json)."""
    return {k: v for k, v in d.items() if k != "_policy"}


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
    first ``n`` entries is the keep set with each segment's count raised to its last entry. Layer
    gates are not candidates: a probe adjusts widths, and a whole layer is kept or removed by its
    trained gate alone."""
    lg = store.logits.detach().cpu()
    cands: list[tuple[float, str, int]] = []
    for s in (s for s in store.segments if s.kind != "layer"):
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
    count lowered to its last entry. Layer gates are not candidates (see
    :func:`closed_gates_by_logit`)."""
    lg = store.logits.detach().cpu()
    cands: list[tuple[float, str, int]] = []
    for s in (s for s in store.segments if s.kind != "layer"):
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
        return max(within, key=_criterion), True
    return min(trials, key=lambda t: t["median_ms"]), False
