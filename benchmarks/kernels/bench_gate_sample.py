"""Claim: sampling every gate of a 32-layer store (32 x (32 heads + 86 FFN groups)) is one launch
and >= 20x faster than a per-module eager loop, forward and forward + backward.

Compared in the same run: the per-module loop, the vectorised torch reference, the Triton op.
Run: ``PYTHONPATH=. python benchmarks/kernels/bench_gate_sample.py`` (GPU) or ``--dry-run``.
"""

from __future__ import annotations

import kbench  # noqa: I001
import torch
from store_loops import sample_loop

from hawada.ops import gate_sample, use_backend


def main() -> None:
    kbench.parse(__doc__.splitlines()[0])
    dev = kbench.device()
    store = kbench.store_32_layers(dev, layers=4 if kbench.DRY else 32)
    lg, tau = store.logits, store.tau
    noise = torch.rand(len(store), device=dev)

    def run(backend):
        def f():
            with use_backend(backend):
                return gate_sample(lg, noise, tau, "hard_concrete", store.config.stretch)

        def fb():
            f().sum().backward()

        return f, fb

    t_f, t_fb = run("torch")
    k_f, k_fb = run("triton")

    def loop_f():
        return sample_loop(store, noise)

    def loop_fb():
        torch.stack([z.sum() for z in sample_loop(store, noise)]).sum().backward()

    with torch.no_grad():
        err = (k_f() - torch.cat(loop_f())).abs().max().item()
    res = {"gates": len(store), "segments": store.num_segments, "max_abs_diff_vs_loop": err}
    for key, fn in (("loop_fwd", loop_f), ("torch_fwd", t_f), ("fused_fwd", k_f)):
        res[key] = kbench.bench(fn)
    for key, fn in (("loop_fwd_bwd", loop_fb), ("torch_fwd_bwd", t_fb), ("fused_fwd_bwd", k_fb)):
        res[key] = kbench.bench(fn, grad_to_none=[lg])
    res["fwd_speedup_vs_loop"] = kbench.ratio(res["loop_fwd"], res["fused_fwd"])  # aim >= 20
    res["fwd_bwd_speedup_vs_loop"] = kbench.ratio(res["loop_fwd_bwd"], res["fused_fwd_bwd"])
    res["fwd_speedup_vs_torch"] = kbench.ratio(res["torch_fwd"], res["fused_fwd"])
    kbench.write_result(
        "kernels_gate_sample" + ("_dryrun" if kbench.DRY else ""),
        {"device": dev, "dry_run": kbench.DRY, "mode": "hard_concrete", **res},
    )


if __name__ == "__main__":
    main()
