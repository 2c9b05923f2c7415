"""Claim: gated_linear's forward costs what a plain matmul costs (gate in the epilogue / prologue),
and forward + backward (incl. the gate gradient) beats the eager composition (mm, mul, reduction).

Per shape (bf16): ``torch.mm`` of the same shape; the eager composition (the torch reference,
forward and autograd backward); the Triton op. Shapes: LLaMA-3.2-1B MLP (2048 <-> 8192, FFN groups
of 96) and attention output (2048 x 2048, 32 heads of 64) at 4096 and 8192 tokens; ViT-B/16 at
batch 64 (197 tokens: 768 <-> 3072, 12 heads of 64).

Run: ``PYTHONPATH=. python benchmarks/kernels/bench_gated_linear.py`` (GPU) or ``--dry-run``.
"""

from __future__ import annotations

import kbench  # noqa: I001  (sets TRITON_INTERPRET for --dry-run before torch/triton load)
import torch

from hawada.ops import gated_linear, gated_linear_ref, use_backend

# name, tokens, in K, out N, side, group
SHAPES = [
    (f"llama1b.{part}.t{t}", t, k, n, side, g)
    for t in (4096, 8192)
    for part, k, n, side, g in (
        ("mlp_up", 2048, 8192, "out", 96),
        ("mlp_down", 8192, 2048, "in", 96),
        ("attn_out", 2048, 2048, "in", 64),
    )
] + [
    ("vitb16.b64.mlp_fc1", 64 * 197, 768, 3072, "out", 96),
    ("vitb16.b64.mlp_fc2", 64 * 197, 3072, 768, "in", 96),
    ("vitb16.b64.attn_out", 64 * 197, 768, 768, "in", 64),
]
DRY_SHAPES = [("dry.out", 67, 96, 80, "out", 16), ("dry.in", 67, 96, 80, "in", 16)]


def main() -> None:
    kbench.parse(__doc__.splitlines()[0])
    dev = kbench.device()
    dtype = torch.float32 if kbench.DRY else torch.bfloat16
    rows = [measure(*shape, dev, dtype) for shape in (DRY_SHAPES if kbench.DRY else SHAPES)]
    kbench.write_result(
        "kernels_gated_linear" + ("_dryrun" if kbench.DRY else ""),
        {
            "device": dev,
            "dry_run": kbench.DRY,
            "timer": "wall" if kbench.DRY else "triton.testing.do_bench",
            "rows": rows,
        },
    )


def measure(name: str, t: int, k: int, n: int, side: str, g: int, dev: str, dtype: torch.dtype) -> dict:
    """One shape: mm, eager and fused forward, eager and fused forward + backward."""
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(t, k, device=dev, dtype=dtype, generator=gen)
    w = (torch.randn(n, k, device=dev, dtype=dtype, generator=gen) / k**0.5).requires_grad_()
    b = torch.zeros(n, device=dev, dtype=dtype).requires_grad_()
    feats = n if side == "out" else k
    m = torch.rand(-(-feats // g), device=dev, generator=gen).requires_grad_()
    xg = x.clone().requires_grad_()
    dy = torch.randn(t, n, device=dev, dtype=dtype, generator=gen)
    wd, leaves = w.detach(), [xg, w, b, m]

    def mm():
        return torch.mm(x, wd.t())

    def eager_fwd():
        return gated_linear_ref(x, wd, b.detach(), m.detach(), side, g)

    def fused_fwd():
        with use_backend("triton"):
            return gated_linear(x, wd, b.detach(), m.detach(), side, g)

    def eager_fb():
        gated_linear_ref(xg, w, b, m, side, g).backward(dy)

    def fused_fb():
        with use_backend("triton"):
            gated_linear(xg, w, b, m, side, g).backward(dy)

    with torch.no_grad():
        err = (fused_fwd().float() - eager_fwd().float()).abs().max().item()
    r = {
        "shape": name,
        "tokens": t,
        "in_features": k,
        "out_features": n,
        "side": side,
        "group_size": g,
        "dtype": str(dtype),
        "max_abs_diff_vs_torch": err,
        "mm": kbench.bench(mm),
        "eager_fwd": kbench.bench(eager_fwd),
        "fused_fwd": kbench.bench(fused_fwd),
        "eager_fwd_bwd": kbench.bench(eager_fb, grad_to_none=leaves),
        "fused_fwd_bwd": kbench.bench(fused_fb, grad_to_none=leaves),
    }
    r["fwd_vs_mm"] = r["fused_fwd"]["median_ms"] / r["mm"]["median_ms"]  # aim <= 1.05
    r["fwd_speedup_vs_eager"] = kbench.ratio(r["eager_fwd"], r["fused_fwd"])
    r["fwd_bwd_speedup_vs_eager"] = kbench.ratio(r["eager_fwd_bwd"], r["fused_fwd_bwd"])  # aim >= 1.15
    print(
        f"{name:28s} mm {r['mm']['median_ms']:.3f} fused fwd {r['fused_fwd']['median_ms']:.3f} "
        f"(x{r['fwd_vs_mm']:.3f} of mm) fwd+bwd eager {r['eager_fwd_bwd']['median_ms']:.3f} "
        f"fused {r['fused_fwd_bwd']['median_ms']:.3f} (x{r['fwd_bwd_speedup_vs_eager']:.2f})",
        flush=True,
    )
    return r


if __name__ == "__main__":
    main()
