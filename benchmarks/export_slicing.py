"""Claim: export's weight slicing, batched through the C++ ``slice_many``, runs near the speed of a
plain copy of the same bytes and beats the per-tensor Python slicing that export used before.

Two workloads, both timed interleaved in one run (median, p20/p80 of repeated runs):
  * llama1b: the slice jobs of a LLaMA-3.2-1B-shaped decoder (16 layers, hidden 2048, 32 query /
    8 KV heads of 64, FFN 8192; bf16 random weights) pruned to 24 query heads (3 of 4 per KV
    group, all KV heads) and FFN 6144 -- the jobs the decoder adapter's ``slice_linear`` calls
    make (q/k/v rows, o columns, gate/up rows, down columns).
  * resnet50: the jobs recorded from the ResNet adapter's real ``export_pruned`` of a gated
    torchvision ResNet-50 (fp32) with random gate logits (~70% of units open).
Methods: ``cpp_slice_many`` (one call, destinations preallocated), ``cpp_slice_many_alloc``
(allocating its outputs), ``python_slice_many_ref`` (index_select per tensor and dim into the
same destinations), ``python_per_tensor`` (export's previous path: ``slice_tensor`` per dim,
allocating), and ``copy_limit``: ``Tensor.copy_`` of one buffer with as many bytes as all
outputs together. GB/s = output bytes / time (a gather reads and writes each kept byte once,
as the copy does). Plus ResNet-50 ``hawada.export`` end to end (check off) with the extension
on and off.

Run: python benchmarks/export_slicing.py [--layers 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import interleaved, summarize_samples, write_result

from hawada import _ext
from hawada.core.export import slice_tensor
from hawada.core.slicing import batched_slicing
from hawada.ops import slice_many, slice_many_ref


def llama_jobs(layers: int, gen: torch.Generator) -> list[tuple]:
    hidden, heads, kv, hd, ffn = 2048, 32, 8, 64, 8192
    dt = torch.bfloat16
    n_rep = heads // kv
    slots = torch.arange(3)  # 3 of 4 query slots per KV group
    groups = torch.arange(kv)
    ar = torch.arange(hd)
    q_rows = ((groups.view(-1, 1) * n_rep + slots.view(1, -1)).reshape(-1).view(-1, 1) * hd + ar).reshape(-1)
    kv_rows = (groups.view(-1, 1) * hd + ar).reshape(-1)
    f_keep = torch.randperm(ffn, generator=gen)[:6144].sort().values
    jobs = []
    for _ in range(layers):
        w = {
            "q": torch.empty(heads * hd, hidden, dtype=dt).uniform_(generator=gen),
            "k": torch.empty(kv * hd, hidden, dtype=dt).uniform_(generator=gen),
            "v": torch.empty(kv * hd, hidden, dtype=dt).uniform_(generator=gen),
            "o": torch.empty(hidden, heads * hd, dtype=dt).uniform_(generator=gen),
            "gate": torch.empty(ffn, hidden, dtype=dt).uniform_(generator=gen),
            "up": torch.empty(ffn, hidden, dtype=dt).uniform_(generator=gen),
            "down": torch.empty(hidden, ffn, dtype=dt).uniform_(generator=gen),
        }
        jobs += [
            (w["q"], q_rows, None),
            (w["k"], kv_rows, None),
            (w["v"], kv_rows, None),
            (w["o"], None, q_rows),
            (w["gate"], f_keep, None),
            (w["up"], f_keep, None),
            (w["down"], None, f_keep),
        ]
    return jobs


def resnet50_jobs() -> tuple[list[tuple], object]:
    import torchvision

    import hawada

    torch.manual_seed(0)
    gated = hawada.attach(torchvision.models.resnet50(num_classes=1000))
    store = hawada.gates(gated)
    with torch.no_grad():
        store.logits.copy_(torch.randn(store.logits.shape) + 0.5)  # ~70% open
    from hawada.core.export import ExportPolicy, adapter_of, keep_indices

    keep = keep_indices(store, ExportPolicy())
    with batched_slicing(True) as batch:
        adapter_of(gated).export_pruned(gated, keep)
        recorded = [(src, r, c) for _, src, r, c in batch.jobs]
    return recorded, gated


def measure(name: str, jobs: list[tuple], rounds: int, repeats: int) -> dict:
    srcs, rows, cols = (list(x) for x in zip(*jobs))
    outs = slice_many_ref(srcs, rows, cols)
    nbytes = sum(o.numel() * o.element_size() for o in outs)
    src_bytes = sum(s.numel() * s.element_size() for s in srcs)
    flat_src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    flat_dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
    have_ext = _ext.available()

    def cpp():
        slice_many(srcs, rows, cols, out=outs)

    def cpp_alloc():
        slice_many(srcs, rows, cols)

    def ref():
        slice_many_ref(srcs, rows, cols, out=outs)

    def per_tensor():
        for s, r, c in jobs:
            slice_tensor(slice_tensor(s, 0, r), 1, c) if s.dim() >= 2 else slice_tensor(s, 0, r)

    def copy():
        flat_dst.copy_(flat_src)

    fns = {"copy_limit": copy, "python_slice_many_ref": ref, "python_per_tensor": per_tensor}
    if have_ext:
        fns = {"cpp_slice_many": cpp, "cpp_slice_many_alloc": cpp_alloc, **fns}
    # Correctness of what is timed: bitwise equal to the reference.
    check = slice_many(srcs, rows, cols)
    ref_out = slice_many_ref(srcs, rows, cols)
    exact = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(check, ref_out))
    del check, ref_out
    # one warm-up call each: first touch of every destination page
    res = interleaved(fns, rounds=rounds, repeats=repeats, warmup=1)
    for r in res.values():
        r["GBps"] = nbytes / (r["median_ms"] * 1e-3) / 1e9
    lim = res["copy_limit"]["median_ms"]
    for k in res:
        res[k]["fraction_of_copy_limit"] = lim / res[k]["median_ms"]
    out = {
        "tensors": len(jobs),
        "source_bytes": src_bytes,
        "output_bytes": nbytes,
        "bitwise_equal_to_reference": exact,
        "methods": res,
    }
    if have_ext:
        out["speedup_cpp_vs_python_per_tensor"] = (
            res["python_per_tensor"]["median_ms"] / res["cpp_slice_many"]["median_ms"]
        )
        out["speedup_cpp_vs_python_slice_many_ref"] = (
            res["python_slice_many_ref"]["median_ms"] / res["cpp_slice_many"]["median_ms"]
        )
    print(name, {k: round(v["median_ms"], 2) for k, v in res.items()})
    return out


def export_end_to_end(gated, rounds: int) -> dict:
    import hawada
    from hawada.core.export import ExportPolicy

    pol = ExportPolicy(check=False)
    samples: dict[str, list[float]] = {"export_ext": [], "export_python": []}
    for _ in range(rounds + 1):
        for k in samples:
            os.environ["HAWADA_EXT"] = "auto" if k == "export_ext" else "off"
            _ext.reset()
            t0 = time.perf_counter()
            hawada.export(gated, pol)
            samples[k].append((time.perf_counter() - t0) * 1e3)
    os.environ.pop("HAWADA_EXT")
    _ext.reset()
    res = {}
    for k, xs in samples.items():
        s = summarize_samples(xs[1:])  # first round: warm-up
        res[k] = {"median_ms": s["median_ms"], "p20_ms": s["p20_ms"], "p80_ms": s["p80_ms"], "n": len(xs) - 1}
    res["speedup"] = res["export_python"]["median_ms"] / res["export_ext"]["median_ms"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    data = {
        "threads": torch.get_num_threads(),
        "extension": _ext.available(),
        "gbps_convention": "output bytes / median time",
    }
    jobs, gated = resnet50_jobs()
    data["resnet50"] = measure("resnet50", jobs, args.rounds * 2, args.repeats * 2)
    data["resnet50"]["export_end_to_end"] = export_end_to_end(gated, args.rounds * 2)
    del jobs, gated
    data["llama1b"] = {
        "layers": args.layers,
        **measure("llama1b", llama_jobs(args.layers, gen), args.rounds, args.repeats),
    }
    write_result("export_slicing", data)


if __name__ == "__main__":
    main()
