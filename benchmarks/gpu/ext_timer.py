"""GPU step for the compiled extension (needs a CUDA device and ``hawada._C`` built with CUDA).

1. ``slice_many`` on CUDA: bitwise equality with the torch reference (several dtypes, a
   non-contiguous source, an empty keep set) and GB/s of the LLaMA-1B-shaped slice jobs
   (16 layers, bf16) against ``Tensor.copy_`` of the same bytes.
2. Timers on a small launch-bound model (16 x Linear(64, 64) + ReLU, batch 1) and a large one
   (ResNet-50, batch 32, fp16): ``cpp_cuda_graph`` (graph replays enqueued from C++, one event
   pair each, one host wait), ``cuda_graph`` (the Python loop: replay + event pair + sync per
   sample) and ``cuda_event`` (eager, no graph); the C++ loop also with an L2 flush before each
   replay. Interleaved rounds; median, p20/p80 of each.

Build and run (about 3 minutes with the build):
  HAWADA_BUILD_EXT=1 HAWADA_BUILD_CUDA=1 python setup.py build_ext --inplace
  python benchmarks/gpu/ext_timer.py
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from common import summarize_samples, write_result  # noqa: E402
from torch import nn  # noqa: E402

from hawada import _ext  # noqa: E402
from hawada.core.profiler import measure_latency_ms  # noqa: E402
from hawada.ops import slice_many, slice_many_ref  # noqa: E402


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def check_slicing(dev: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    ok = {}
    for dt in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.int8,
        torch.int64,
        torch.complex128,
        torch.bool,
    ):
        raw = torch.randint(
            0, 2 if dt == torch.bool else 256, (64 * 48 * 3 * 3 * 16,), dtype=torch.uint8, generator=gen
        )
        src4 = (raw.bool() if dt == torch.bool else raw.view(dt))[: 64 * 48 * 9].reshape(64, 48, 3, 3).to(dev)
        srcs = [src4, src4.transpose(0, 1), src4[:, :, 0, 0].t(), src4.flatten()[::3]]
        rows = [
            torch.tensor([5, 0, 63, 7]),
            torch.zeros(0, dtype=torch.long),
            None,
            torch.tensor([1, 2], dtype=torch.int32),
        ]
        cols = [torch.tensor([47, 1], dtype=torch.int32), torch.tensor([3]), torch.tensor([0, 0, 9]), None]
        got = slice_many(srcs, rows, cols)
        ref = slice_many_ref(srcs, rows, cols)
        ok[str(dt)] = all(bitwise(a, b) for a, b in zip(got, ref))
    try:
        slice_many([src4], [torch.tensor([64])], [None])
        ok["out_of_range_raises"] = False
    except ValueError:
        ok["out_of_range_raises"] = True
    return ok


def slicing_bandwidth(dev: torch.device) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from export_slicing import llama_jobs

    jobs = [(s.to(dev), r, c) for s, r, c in llama_jobs(16, torch.Generator().manual_seed(0))]
    srcs, rows, cols = (list(x) for x in zip(*jobs))
    outs = slice_many(srcs, rows, cols)
    nbytes = sum(o.numel() * o.element_size() for o in outs)
    a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    fns = {
        "cpp_slice_many": lambda: slice_many(srcs, rows, cols, out=outs),
        "python_slice_many_ref": lambda: slice_many_ref(srcs, rows, cols, out=outs),
        "copy_limit": lambda: b.copy_(a),
    }
    samples = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(5):
        for k, f in fns.items():
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                torch.cuda.synchronize()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    res = {}
    for k, xs in samples.items():
        s = summarize_samples(xs)
        res[k] = {"median_ms": s["median_ms"], "p20_ms": s["p20_ms"], "p80_ms": s["p80_ms"], "n": len(xs)}
        res[k]["GBps"] = nbytes / (s["median_ms"] * 1e-3) / 1e9
    for k in res:
        res[k]["fraction_of_copy_limit"] = res["copy_limit"]["median_ms"] / res[k]["median_ms"]
    return {"output_bytes": nbytes, "tensors": len(jobs), "methods": res}


def timers(dev: torch.device) -> dict:
    import torchvision

    models = {
        "small": (
            nn.Sequential(*[m for _ in range(16) for m in (nn.Linear(64, 64), nn.ReLU())]).to(dev),
            torch.randn(1, 64, device=dev),
        ),
        "large": (
            torchvision.models.resnet50().to(dev, torch.float16),
            torch.randn(32, 3, 224, 224, device=dev, dtype=torch.float16),
        ),
    }
    variants = {
        "cpp_cuda_graph": dict(cuda_graph=True, timer="cpp"),
        "cpp_cuda_graph_l2_flush": dict(cuda_graph=True, timer="cpp", flush_l2=True),
        "python_cuda_graph": dict(cuda_graph=True, timer="python"),
        "python_cuda_event": dict(cuda_graph=False, timer="python"),
    }
    out = {}
    for name, (model, x) in models.items():
        samples = {k: [] for k in variants}
        used = {}
        for _ in range(4):
            for k, kw in variants.items():
                r = measure_latency_ms(model, x, device=dev, warmup=3, min_repeats=50, max_repeats=50, **kw)
                samples[k] += r.samples_ms
                used[k] = r.timer
        out[name] = {}
        for k, xs in samples.items():
            s = summarize_samples(xs)
            out[name][k] = {
                "timer": used[k],
                "median_ms": s["median_ms"],
                "p20_ms": s["p20_ms"],
                "p80_ms": s["p80_ms"],
                "spread_ms": s["p80_ms"] - s["p20_ms"],
                "n": len(xs),
            }
        print(name, {k: round(v["median_ms"], 4) for k, v in out[name].items()})
    return out


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    if not _ext.has_cuda():
        raise SystemExit(
            "hawada._C is not built with CUDA: HAWADA_BUILD_EXT=1 HAWADA_BUILD_CUDA=1 python setup.py build_ext --inplace"
        )
    dev = torch.device("cuda")
    data = {"slicing_equality": check_slicing(dev)}
    print(data)
    data["slicing_bandwidth"] = slicing_bandwidth(dev)
    data["timers"] = timers(dev)
    write_result("ext_timer_gpu", data)


if __name__ == "__main__":
    main()
