"""Search phase: choose the export by measured latency, and export the slim model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawada.core.distributed import on_main
from hawada.core.export import export, keep_counts, store_of
from hawada.core.gates import GateStore
from hawada.core.loop import to_device
from hawada.core.profiler import LatencyResult, Meter
from hawada.core.search_export import SearchResult, search_export
from hawada.run.context import RunContext
from hawada.run.setup import Setup, progress_bar


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


QUALITY_KEY = "output_cosine"  # each trial's quality in report.json's search.trials
QUALITY_LABEL = "output cosine to the teacher (one fixed training batch)"


def output_cosine(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean cosine similarity of ``out`` and ``ref`` along the last dimension.

    ``out``, ``ref``: ``[..., D]`` (``[B, C]`` logits, ``[B, D]`` embeddings, ``[B, L, V]`` token
    logits); ``mask``: ``[...]`` (e.g. ``[B, L]``), rows where it is 0 are left out; a mask of
    another shape (token positions of a pooled ``[B, D]`` output) is not applied.
    """
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=-1)
    if mask is not None and mask.shape == cos.shape:
        cos = cos[mask.to(torch.bool)]
    return float(cos.mean())


def fixed_batch(loader: Iterable) -> Any:
    """The first batch of ``loader`` in its unshuffled (DataLoader) or first-epoch order, drawn
    without moving any state the training phases draw from (the loader's epoch, its sampler's
    generator, the global RNG): the same batch whenever it is asked for."""
    from torch.utils.data import DataLoader

    with torch.random.fork_rng(devices=[]):
        if isinstance(loader, DataLoader):
            plain = DataLoader(
                loader.dataset, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn
            )
            return next(iter(plain))
        own = copy.copy(loader)  # the data's own loaders count epochs as they are iterated
        if hasattr(own, "set_epoch"):
            own.set_epoch(0)
        return next(iter(own))


class TrialScorer:
    """Scores each export the search times by how close its outputs stay to the teacher's on one
    fixed batch, the same batch for every trial: a cheap quality axis for the search's trials
    (the full test-split agreement is measured for the chosen model only).

    ``meter(model)`` wraps a latency meter: every model it times other than ``reference`` (the
    keep-all model a ratio target times next to each export) is scored once, when first timed;
    the search times one new export per trial, in trial order, before it re-times its finalists,
    so ``scores[i]`` is trial ``i``'s (finalists exported anew for shipping come after).
    """

    def __init__(self, ctx: RunContext, reference: nn.Module | None) -> None:
        self.adapter, self.reference = ctx.adapter, reference
        self.scores: list[float] = []
        self._seen: set[int] = set()
        self.batch = to_device(fixed_batch(ctx.job.train_loader), ctx.device)
        self.mask = self.adapter.kd_mask(self.batch)
        self.ref_out = self._output(ctx.teacher)

    @torch.no_grad()
    def _output(self, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return self.adapter.output(model, self.batch)
        finally:
            model.train(was_training)

    def score(self, model: nn.Module) -> float:
        return output_cosine(self._output(model), self.ref_out, self.mask)

    def wrap(self, meter: Meter) -> Callable[[nn.Module], LatencyResult]:
        def scored(model: nn.Module) -> LatencyResult:
            res = meter(model)
            if model is not self.reference and id(model) not in self._seen:
                self._seen.add(id(model))
                self.scores.append(self.score(model))
            return res

        return scored

    def annotate(self, search: SearchResult) -> None:
        """Add each trial's score (and the chosen one's) under :data:`QUALITY_KEY`."""
        if len(self.scores) < len(search.trials):  # a search that timed otherwise: no scores
            return
        for t, q in zip(search.trials, self.scores):
            t[QUALITY_KEY] = q
        chosen = search.best.get("trial")  # the re-timed finalist names its trial
        if chosen is None and search.best in search.trials:
            chosen = search.trials.index(search.best)
        if chosen is not None and not search.best.get("uniform"):
            search.best[QUALITY_KEY] = self.scores[chosen]


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
    cfg = recipe.search
    # meter calls: each trial times its export (after keep-all, with a ratio target; the fill/trim
    # probes are an upper bound: the binary search may stop early), then the finalists and
    # keep-all are re-timed together, confirm_rounds rounds each
    per = 2 if by_ratio else 1
    calls = (len(cfg.multiples) * len(cfg.modes) + cfg.fill_probes) * per
    calls += (cfg.finalists + 2) * cfg.confirm_rounds

    def run_search() -> SearchResult:
        scorer = TrialScorer(ctx, reference)
        with progress_bar(ctx, "search: latency measurements", calls) as bar:
            meter = scorer.wrap(bar.counting(ctx.meter))
            res = search_export(
                student, setup.target_ms, meter, cfg, reference=reference, ratio=ratio, ship=ship
            )
            bar.finish()
        scorer.annotate(res)
        return res

    search = on_main(ctx.env, run_search)
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
