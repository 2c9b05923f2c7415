"""Shared pieces of the kernel benchmarks: timing (``triton.testing.do_bench`` on a GPU), shapes,
the 32-layer gate store, and the per-module eager loops the store ops are compared with.

``--dry-run`` (set before anything imports Triton): tiny shapes on the CPU, the Triton kernels
under the interpreter, wall-clock timing. It checks that every code path runs; its numbers mean
nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import sys

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/ (common.py)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the checkout's package

import torch  # noqa: E402
from common import time_fn, write_result  # noqa: E402

from hawada.core.gates import GateConfig, GateStore  # noqa: E402

__all__ = ["DRY", "bench", "device", "parse", "store_32_layers", "write_result"]


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    return p.parse_args()


def device() -> str:
    if DRY:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("kernel benchmarks need a CUDA device (or --dry-run)")
    return "cuda"


def bench(fn, grad_to_none=None) -> dict:
    """Median and p20/p80 in ms: ``do_bench`` (CUDA events, L2 flushed) on a GPU; wall clock in a dry run."""
    if DRY:
        return time_fn(fn, repeats=3, warmup=1)
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def ratio(base: dict, new: dict) -> float:
    """How many times faster ``new`` is than ``base`` (medians)."""
    return base["median_ms"] / new["median_ms"]


def store_32_layers(dev: str, layers: int = 32, mode: str = "hard_concrete") -> GateStore:
    """A LLaMA-3.2-1B-like store: per layer 32 heads (group 1) + 86 FFN groups of 96 (8192 units)."""
    store = GateStore(GateConfig(mode=mode, min_keep={"head": 1, "ffn": 4}))
    for i in range(layers):
        store.register(f"layers.{i}.attn.heads", "head", 32, 1, layer=i)
        store.register(f"layers.{i}.mlp.groups", "ffn", 8192, 96, layer=i)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        store.logits.copy_(torch.randn(len(store), generator=g) * 2)
    store.set_segment_costs(torch.rand(store.num_segments, generator=g) + 0.5)
    return store.to(dev)
