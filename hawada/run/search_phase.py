"""Search phase: choose the export by measured latency, and export the slim model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hawada.core.distributed import on_main
from hawada.core.export import export, keep_counts, store_of
from hawada.core.gates import GateStore
from hawada.core.search_export import SearchResult, search_export
from hawada.run.context import RunContext
from hawada.run.setup import Setup


@dataclass
class SearchPhase:
    """The chosen export. ``target_ms`` is what it was held to; ``base_ms`` the keep-all timed next
    to it (None for an absolute target)."""

    search: SearchResult
    slim: nn.Module
    target_ms: float
    base_ms: float | None
    units_moved_frac: float  # units whose keep status the search changed, over all units


def units_moved(store: GateStore, counts: dict[str, int]) -> float:
    """Fraction of all units kept by ``counts`` but closed in eval mode, or the reverse (keep
    sets grow and shrink in logit order, so a count difference is that many moved units)."""
    open_u = [int(round(v)) for v in store.open_units().tolist()]
    moved = sum(abs(counts[s.name] - o) for s, o in zip(store.segments, open_u))
    return moved / sum(s.units for s in store.segments)


def search_and_export(ctx: RunContext, student: nn.Module, setup: Setup) -> SearchPhase:
    """Measure the candidate exports of the trained gated ``student`` (rank 0 times; every rank gets
    the result) and export the chosen one (``export.uniform``: every layer the same widths)."""
    recipe = ctx.recipe
    # a fraction of keep-all: each export is timed right after keep-all and held to the ratio of
    # that measurement, so load that comes and goes on the machine moves both sides alike
    by_ratio = recipe.target.latency_ms is None
    reference, ratio = (ctx.teacher, recipe.target.ratio) if by_ratio else (None, None)
    # export.uniform ships the uniform layout of the chosen keep set: the finalists are timed as
    # that model, so the search's choice and its metadata are about the model that is shipped
    ship = (lambda p: ctx.adapter.uniform_policy(student, p)) if recipe.export.uniform else None
    search = on_main(
        ctx.env,
        lambda: search_export(
            student, setup.target_ms, ctx.meter, recipe.search, reference=reference, ratio=ratio, ship=ship
        ),
    )
    best = search.best
    best["uniform"] = bool(recipe.export.uniform)
    base_ms = best["reference_ms"] if by_ratio else None
    target_ms = best["limit_ms"]
    lo, hi = best["ratio_ci"]
    ctx.log(
        f"search: {len(search.trials)} exports measured, {len(search.finalists)} re-timed; chose "
        f"multiple={best['multiple']} mode={best['mode']}{' (uniform layout)' if recipe.export.uniform else ''} "
        f"({best['median_ms']:.2f} ms, target {target_ms:.2f} ms"
        + (f" = {ratio:g} x keep-all {base_ms:.2f} ms timed with it" if by_ratio else "")
        + f"; ratio {best['ratio']:.3f}, 95% {lo:.3f}-{hi:.3f})"
    )
    if search.fallback:
        ctx.log(f"search: target not met with a margin for the timing spread: {search.fallback}")
    policy = search.policy
    slim = export(student, policy).to(ctx.device)
    moved = units_moved(store_of(student), keep_counts(store_of(student), policy))
    return SearchPhase(search, slim, target_ms, base_ms, moved)
