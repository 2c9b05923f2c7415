"""Checkpoint write time for a LLaMA-1B-shaped gated student (weights + AdamW state + gates).

The student has the real Llama-3.2-1B shapes (hidden 2048, 32 heads / 8 KV heads, MLP 8192,
vocab 128256, tied embeddings) with ``--layers`` decoder layers (16 in the real model; fewer
fit this machine's time and disk): the bytes of one checkpoint and the write rate are measured,
and the full 16-layer checkpoint size is computed from the per-layer bytes. Baseline in the same
run: a plain ``safetensors.save_file`` of the same tensors without fsync, pointer and rename,
i.e. what crash safety costs.

Run: python benchmarks/checkpoint_write.py [--layers 1] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from common import write_result


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hawada

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(cfg)
    student = hawada.attach(model, hawada.GateConfig())
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:  # one step on zero gradients: AdamW's state exists at its real size
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return student, opt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    from safetensors.torch import save_file

    from hawada.core.checkpoint import _dedupe, optimizer_state, rng_state, save_checkpoint

    torch.manual_seed(0)
    student, opt = build(a.layers)
    tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
    ot, oj = optimizer_state(opt, "opt_w")
    tensors.update(ot)
    rt, rj = rng_state()
    tensors.update(rt)
    state = {"step": 1, "opt_w": oj, "rng": rj}
    root = tempfile.mkdtemp(dir=a.dir)
    safe: list[float] = []
    plain: list[float] = []
    try:
        for i in range(a.repeats):  # interleaved: safe, plain, safe, plain, ...
            t0 = time.perf_counter()
            path = save_checkpoint(os.path.join(root, "ck"), i + 1, tensors, state)
            safe.append(time.perf_counter() - t0)
            nbytes = os.path.getsize(path)
            flat, _ = _dedupe(tensors)
            t0 = time.perf_counter()
            save_file(flat, os.path.join(root, "plain.safetensors"))
            plain.append(time.perf_counter() - t0)
            os.remove(os.path.join(root, "plain.safetensors"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def stats(xs: list[float]) -> dict:
        xs = sorted(xs)
        return {"median_s": xs[len(xs) // 2], "min_s": xs[0], "max_s": xs[-1], "n": len(xs)}

    emb = 128256 * 2048
    n_params = sum(p.numel() for p in student.parameters())
    per_layer = (n_params - emb) / a.layers  # gates included
    bytes_per_param = nbytes / n_params  # weights + 2 AdamW moments (fp32)
    full_bytes = (emb + 16 * per_layer) * bytes_per_param
    s, p = stats(safe), stats(plain)
    write_result(
        "checkpoint_write",
        {
            "what": "atomic checkpoint (safetensors + JSON header, fsync, rename, pointer) of a gated "
            "LLaMA-1B-shaped student with AdamW state; baseline: plain safetensors.save_file, same run",
            "layers_measured": a.layers,
            "params_measured": n_params,
            "checkpoint_bytes": nbytes,
            "atomic_write": s,
            "plain_save_file": p,
            "write_GBps": nbytes / s["median_s"] / 1e9,
            "atomic_over_plain": s["median_s"] / p["median_s"],
            "full_16_layer_bytes_computed": full_bytes,
            "full_16_layer_seconds_at_measured_rate": full_bytes / (nbytes / s["median_s"]),
        },
    )


if __name__ == "__main__":
    main()
