"""Train the tiny LLaMA-style teacher (GQA, byte-level) on the standard library's source text.

The model is cached with ``save_pretrained`` under ``.hawada_cache/tiny-llama`` in the
repository root (a stock ``LlamaForCausalLM`` folder) and is what ``recipes/cpu/tiny-llama.yaml``
prunes. Budgeted by steps (and a wall-clock cap, since the CPU may be shared).

    python benchmarks/train_tiny_llama.py [--steps 700] [--minutes 14] [--out .hawada_cache/tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hawada.core.profiler import environment_info  # noqa: E402
from hawada.data.lm import BOS, EOS, PAD, VOCAB_SIZE, stdlib_splits  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, ".hawada_cache", "tiny-llama")


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=320,
        intermediate_size=864,
        num_hidden_layers=4,
        num_attention_heads=10,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


@torch.no_grad()
def perplexity(model, loader) -> float:
    """exp(mean next-token cross-entropy) over every position of ``loader``'s sequences."""
    model.eval()
    tot, n = 0.0, 0
    for batch in loader:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
        )
        tot += float(loss)
        n += ids[:, 1:].numel()
    return math.exp(tot / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--minutes", type=float, default=14.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--init", default=None, help="continue training from this saved folder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import LlamaForCausalLM

    data = stdlib_splits(args.seq_len, args.batch_size, eval_sequences=64, seed=args.seed)
    prior = {}
    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, local_files_only=True)
        with open(os.path.join(args.init, "training.json")) as f:
            prior = json.load(f)
    else:
        model = LlamaForCausalLM(tiny_llama_config())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f} M, train sequences {data['train'].sequences.shape[0]}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = 10 if args.init else 50

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, args.steps - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    step, losses = 0, []
    it = iter(data["train"])
    while step < args.steps and time.perf_counter() - t0 < args.minutes * 60:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(data["train"])
            batch = next(it)
        model.train()
        ids = batch["input_ids"]
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(float(out.loss.detach()))
        if step % 25 == 0:
            el = time.perf_counter() - t0
            print(f"step {step} loss {sum(losses[-25:]) / 25:.3f} ({el:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    val_ppl, test_ppl = perplexity(model, data["val"]), perplexity(model, data["test"])
    print(f"done: {step} steps in {seconds:.0f} s; val ppl {val_ppl:.3f}, test ppl {test_ppl:.3f}")
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    info = {
        "steps": step + prior.get("steps", 0),
        "seconds": seconds + prior.get("seconds", 0.0),
        "sessions": prior.get("sessions", []) + [{"steps": step, "seconds": seconds, "lr": args.lr}],
        "params": n_params,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "final_train_loss_25": sum(losses[-25:]) / max(1, len(losses[-25:])),
        "val_ppl_per_byte": val_ppl,
        "test_ppl_per_byte": test_ppl,
        "versions": environment_info(),
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(info, f, indent=1)
    res = os.path.join(ROOT, "benchmarks", "results", "tiny_llama_teacher.json")
    os.makedirs(os.path.dirname(res), exist_ok=True)
    with open(res, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
