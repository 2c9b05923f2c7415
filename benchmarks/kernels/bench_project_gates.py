"""Claim: projecting a 32-layer store's gates into their constraints (clamp + keep min_keep open per
segment) is one in-place launch, no host sync, >= 20x faster than a per-module eager loop.

Compared in the same run: the per-module loop, the vectorised torch reference, the Triton op.
Run: ``PYTHONPATH=. python benchmarks/kernels/bench_project_gates.py`` (GPU) or ``--dry-run``.
"""

from __future__ import annotations

import kbench  # noqa: I001
import torch
from store_loops import project_loop

from hawada.ops import SegmentTable, project_gates, use_backend


def main() -> None:
    kbench.parse(__doc__.splitlines()[0])
    dev = kbench.device()
    store = kbench.store_32_layers(dev, layers=4 if kbench.DRY else 32)
    table = SegmentTable(store.seg_id, store.gate_size, store.seg_start, store.seg_units, store.seg_min_keep)
    start = store.logits.detach().clone() * 4 - 6  # mostly closed: the projection has work to do
    lg = store.logits.data
    clip = store.config.logit_clip

    def run(backend):
        def f():
            lg.copy_(start)
            with use_backend(backend):
                project_gates(lg, table, store.seg_min_keep, clip, 0.05)

        return f

    def loop_f():
        lg.copy_(start)
        project_loop(store)

    def reset():
        lg.copy_(start)

    out = {}
    for name, fn in (("loop", loop_f), ("torch", run("torch")), ("fused", run("triton"))):
        fn()
        out[name] = lg.clone()
    res = {
        "gates": len(store),
        "segments": store.num_segments,
        "fused_equals_torch": bool(torch.equal(out["fused"], out["torch"])),
        "fused_equals_loop": bool(torch.equal(out["fused"], out["loop"])),
        "note": "every timed call includes one copy of the start logits (also timed alone as 'reset')",
    }
    for key, fn in (("reset", reset), ("loop", loop_f), ("torch", run("torch")), ("fused", run("triton"))):
        res[key] = kbench.bench(fn)
    res["speedup_vs_loop"] = kbench.ratio(res["loop"], res["fused"])  # aim >= 20
    res["speedup_vs_torch"] = kbench.ratio(res["torch"], res["fused"])
    kbench.write_result(
        "kernels_project_gates" + ("_dryrun" if kbench.DRY else ""),
        {"device": dev, "dry_run": kbench.DRY, **res},
    )


if __name__ == "__main__":
    main()
