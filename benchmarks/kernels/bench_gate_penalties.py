"""Claim: expected-L0 + keep-floor + bimodality + per-segment expected widths of a 32-layer store
are one launch and >= 20x faster than a per-module eager loop, forward and forward + backward.

Compared in the same run: the per-module loop, the vectorised torch reference, the Triton op.
Run: ``PYTHONPATH=. python benchmarks/kernels/bench_gate_penalties.py`` (GPU) or ``--dry-run``.
"""

from __future__ import annotations

import kbench  # noqa: I001
import torch
from store_loops import penalties_loop

from hawada.core.gates import PenaltyWeights
from hawada.ops import SegmentTable, gate_penalties, use_backend


def main() -> None:
    kbench.parse(__doc__.splitlines()[0])
    dev = kbench.device()
    store = kbench.store_32_layers(dev, layers=4 if kbench.DRY else 32)
    w = PenaltyWeights(l0=1.0, floor=1.0, floor_frac=0.1, bimodal=0.1)
    table = SegmentTable(store.seg_id, store.gate_size, store.seg_start, store.seg_units, store.seg_min_keep)
    lg = store.logits
    gexp = torch.rand(store.num_segments, device=dev)  # the proxy's gradient w.r.t. the widths

    def run(backend):
        def f():
            with use_backend(backend):
                t = gate_penalties(
                    lg, table, store.seg_cost, store.tau, w, "hard_concrete", store.config.stretch
                )
                return t.total, t.expected_units

        def fb():
            total, widths = f()
            (total + (widths * gexp).sum()).backward()

        return f, fb

    t_f, t_fb = run("torch")
    k_f, k_fb = run("triton")

    def loop_f():
        return penalties_loop(store, w)

    def loop_fb():
        total, widths = loop_f()
        (total + (widths * gexp).sum()).backward()

    with torch.no_grad():
        (kt, kw), (lt, lw) = k_f(), loop_f()
        err = max(abs(kt.item() - lt.item()), (kw - lw).abs().max().item())
    res = {"gates": len(store), "segments": store.num_segments, "max_abs_diff_vs_loop": err}
    for key, fn in (("loop_fwd", loop_f), ("torch_fwd", t_f), ("fused_fwd", k_f)):
        res[key] = kbench.bench(fn)
    for key, fn in (("loop_fwd_bwd", loop_fb), ("torch_fwd_bwd", t_fb), ("fused_fwd_bwd", k_fb)):
        res[key] = kbench.bench(fn, grad_to_none=[lg])
    res["fwd_speedup_vs_loop"] = kbench.ratio(res["loop_fwd"], res["fused_fwd"])  # aim >= 20
    res["fwd_bwd_speedup_vs_loop"] = kbench.ratio(res["loop_fwd_bwd"], res["fused_fwd_bwd"])
    res["fwd_speedup_vs_torch"] = kbench.ratio(res["torch_fwd"], res["fused_fwd"])
    kbench.write_result(
        "kernels_gate_penalties" + ("_dryrun" if kbench.DRY else ""),
        {"device": dev, "dry_run": kbench.DRY, "mode": "hard_concrete", **res},
    )


if __name__ == "__main__":
    main()
