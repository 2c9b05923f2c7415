"""Shared benchmark runner: median and spread of repeated timings, JSON results with device and versions."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks run against this checkout's package

from hawada.core.profiler import environment_info, summarize_samples  # noqa: E402


def results_dir() -> str:
    """``$OUT`` when set (GPU runs), else ``benchmarks/results/``."""
    out = os.environ.get("OUT")
    path = os.path.join(out, "results") if out else os.path.join(HERE, "results")
    os.makedirs(path, exist_ok=True)
    return path


def time_fn(
    fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, sync: Callable[[], None] | None = None
) -> dict:
    """Median, p20, p80 (ms) of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        xs.append((time.perf_counter() - t0) * 1e3)
    s = summarize_samples(xs)
    return {"median_ms": s["median_ms"], "p20_ms": s["p20_ms"], "p80_ms": s["p80_ms"], "n": len(xs)}


def interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int = 5, repeats: int = 10, warmup: int = 3
) -> dict:
    """Time several functions in the same run, alternating between them each round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(warmup):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(repeats):
                t0 = time.perf_counter()
                f()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, xs in samples.items():
        s = summarize_samples(xs)
        out[k] = {"median_ms": s["median_ms"], "p20_ms": s["p20_ms"], "p80_ms": s["p80_ms"], "n": len(xs)}
    return out


def write_result(name: str, data: dict) -> str:
    """Write ``data`` + environment as ``results/NAME.json``; returns the path."""
    path = os.path.join(results_dir(), f"{name}.json")
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment_info(),
        **data,
    }
    with open(path + ".partial", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".partial", path)
    print(json.dumps({k: v for k, v in data.items() if k != "raw"}, indent=1)[:4000])
    return path
