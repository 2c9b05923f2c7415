"""Per-module eager baselines for the store ops: what the code would be with one small gate
tensor per module (a Python loop over segments, several small launches each)."""

from __future__ import annotations

import math

import torch


def sample_loop(store, noise: torch.Tensor) -> list[torch.Tensor]:
    """Hard-concrete sample of each segment separately."""
    gamma, zeta = store.config.stretch
    out = []
    for s in store.segments:
        lg, u = store.logits[s.start : s.stop], noise[s.start : s.stop].clamp(1e-6, 1 - 1e-6)
        z = torch.sigmoid(
            (torch.log(u) - torch.log1p(-u) + lg + store.tau * math.log(-gamma / zeta)) / store.tau
        )
        out.append((z * (zeta - gamma) + gamma).clamp(0.0, 1.0))
    return out


def penalties_loop(store, w) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected-L0 + keep-floor + bimodality + expected widths, one segment at a time."""
    num = den = bim = floor = 0.0
    widths = []
    n = 0
    for i, s in enumerate(store.segments):
        p = torch.sigmoid(store.logits[s.start : s.stop])
        gs = store.gate_size[s.start : s.stop]
        e = (p * gs).sum()
        widths.append(e)
        wc = gs * store.seg_cost[i]
        num = num + (p * wc).sum()
        den = den + wc.sum()
        short = torch.relu(w.floor_frac * s.units - e) / s.units
        floor = floor + short * short
        bim = bim + (p * (1 - p)).sum()
        n += s.count
    total = w.l0 * num / den + w.floor * floor / len(store.segments) + w.bimodal * bim / n
    return total, torch.stack(widths)


@torch.no_grad()
def project_loop(store, margin: float = 0.05) -> None:
    """Clamp, then raise the min_keep largest gates of each segment, one segment at a time."""
    clip = store.config.logit_clip
    store.logits.clamp_(-clip, clip)
    for s in store.segments:
        if s.min_keep == 0:
            continue
        seg = store.logits[s.start : s.stop]
        idx = torch.sort(seg, descending=True, stable=True).indices[: s.min_keep]
        seg[idx] = seg[idx].clamp_min(margin)
