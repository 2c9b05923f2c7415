"""Measured sub-architectures: the points the latency proxy is calibrated and checked on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hawada.core.export import ExportPolicy, export, store_of
from hawada.core.profiler import Meter
from hawada.core.proxy_cost import set_random_keep, set_uniform_keep


def measure_subarchs(
    gated: nn.Module,
    logits: list[torch.Tensor],
    meter: Meter,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[torch.Tensor, float]]:
    """For each logits vector ``[N]``: (open units ``[S]``, measured median ms of its export).

    ``progress(done, total)`` is called after each measured export.
    """
    store = store_of(gated)
    out = []
    for i, lg in enumerate(logits):
        with store.logits_as(lg):
            slim = export(gated, ExportPolicy(check=False))
            out.append((store.open_units().detach().cpu(), meter(slim).median_ms))
        if progress:
            progress(i + 1, len(logits))
    return out


def calibration_logits(gated: nn.Module, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` logits vectors: uniform keep fractions first, then random sub-architectures."""
    store = store_of(gated)
    gen = torch.Generator().manual_seed(seed)
    fracs = [1.0, 0.7, 0.45, 0.25]
    out = []
    with store.logits_as(store.logits):
        for i in range(n):
            if i < len(fracs):
                set_uniform_keep(store, fracs[i])
            else:
                set_random_keep(store, gen)
            out.append(store.logits.detach().clone())
    return out


def random_logits(gated: nn.Module, n: int, seed: int) -> list[torch.Tensor]:
    store = store_of(gated)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with store.logits_as(store.logits):
        for _ in range(n):
            set_random_keep(store, gen)
            out.append(store.logits.detach().clone())
    return out
