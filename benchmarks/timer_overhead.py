"""Claim: the C++ timing loop measures the model, not Python: on a small launch-bound model its
median is below the Python loop's (the call overhead is gone) and its spread is no wider; on a
large model both agree.

Models: ``small`` = 16 x (Linear(64, 64) + ReLU) at batch 1 (launch-bound: microseconds of
math per op); ``large`` = torchvision ResNet-18 at 1x3x224x224. Timers: ``cpp_loop`` =
``hawada._C.time_script_cpu`` on the traced model (C++ steady clock, GIL released, graph
executor optimisations off); ``python_loop`` = ``time.perf_counter`` around ``model(x)`` in
``torch.inference_mode`` (the profiler's Python loop). Chunks of each are interleaved in one
run; every sample is kept. One intra-op thread (this CPU is shared, see ``threads``).

Run: python benchmarks/timer_overhead.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from common import summarize_samples, write_result
from torch import nn

from hawada import _ext


def python_loop(model: nn.Module, x: torch.Tensor, n: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(n):
            t0 = time.perf_counter()
            model(x)
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def stats(xs: list[float]) -> dict:
    s = summarize_samples(xs)
    return {
        "median_ms": s["median_ms"],
        "p20_ms": s["p20_ms"],
        "p80_ms": s["p80_ms"],
        "spread_ms": s["p80_ms"] - s["p20_ms"],
        "ci95_ms": s["ci95_ms"],
        "min_ms": s["min_ms"],
        "n": len(xs),
    }


def bench(name: str, model: nn.Module, x: torch.Tensor, rounds: int, chunk: int) -> dict:
    ext = _ext.load()
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        script = torch.jit.trace(model, (x,), check_trace=False)
    ext.time_script_cpu(script, [x], chunk, 3)  # warm-up both
    python_loop(model, x, chunk)
    samples: dict[str, list[float]] = {"cpp_loop": [], "python_loop": []}
    for _ in range(rounds):
        samples["cpp_loop"] += ext.time_script_cpu(script, [x], chunk, 0)
        samples["python_loop"] += python_loop(model, x, chunk)
    res = {k: stats(v) for k, v in samples.items()}
    res["median_ratio_python_over_cpp"] = res["python_loop"]["median_ms"] / res["cpp_loop"]["median_ms"]
    res["median_difference_us"] = (res["python_loop"]["median_ms"] - res["cpp_loop"]["median_ms"]) * 1e3
    print(
        name,
        {
            k: (round(v["median_ms"], 4), round(v["spread_ms"], 4))
            for k, v in res.items()
            if isinstance(v, dict)
        },
    )
    return res


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not _ext.available():
        raise SystemExit("hawada._C is not built: run `make ext` first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    small = nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(64, 64), nn.ReLU())])
    large = torchvision.models.resnet18(num_classes=1000)
    data = {
        "threads": torch.get_num_threads(),
        "small": {
            "model": "16 x (Linear(64,64)+ReLU), input [1, 64]",
            **bench("small", small, torch.randn(1, 64), args.rounds, 200),
        },
        "large": {
            "model": "torchvision resnet18, input [1, 3, 224, 224]",
            **bench("large", large, torch.randn(1, 3, 224, 224), args.rounds, 5),
        },
    }
    write_result("timer_overhead", data)


if __name__ == "__main__":
    main()
