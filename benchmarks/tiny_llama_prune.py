"""Claim: the pruned tiny LLaMA decodes faster on this CPU at a small perplexity cost.

Compares the teacher (``.hawada_cache/tiny-llama``, made by ``train_tiny_llama.py``) with the slim
model the tiny-llama recipe saved (``runs/tiny-llama-decode/slim``), in the same run, interleaved:

* decode: one step of ``--batch`` sequences against a KV cache of ``--context`` tokens -> tokens/s;
* prefill: the forward of ``--batch`` prompts of ``--context`` tokens (ms);
* perplexity (per byte) and top-1 agreement on held-out standard-library modules (test split);
* generate-equality sanity: greedy ``generate()`` of the slim model loaded back with
  ``hawada.load_slim`` equals the in-memory slim model's.

    python benchmarks/tiny_llama_prune.py [--slim runs/tiny-llama-decode/slim] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from common import interleaved, write_result

from hawada.adapters.hf_decoder import layer_widths, load_causal_lm
from hawada.data.lm import stdlib_splits
from hawada.jobs.lm import DecodeStep, PrefillStep, lm_metrics
from hawada.slim_io import load_slim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=os.path.join(ROOT, ".hawada_cache", "tiny-llama"))
    ap.add_argument("--slim", default=os.path.join(ROOT, "runs", "tiny-llama-decode", "slim"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_causal_lm(args.teacher, attn_implementation="sdpa")
    slim = load_slim(args.slim)
    slim.config._attn_implementation = "sdpa"

    dt, ds = DecodeStep(teacher, args.batch, args.context), DecodeStep(slim, args.batch, args.context)
    tok = torch.randint(0, 256, (args.batch, 1), generator=torch.Generator().manual_seed(0))
    prompt = torch.randint(
        0, 256, (args.prefill_batch, args.context), generator=torch.Generator().manual_seed(1)
    )
    pt, ps = PrefillStep(teacher), PrefillStep(slim)
    with torch.inference_mode():
        dec = interleaved({"teacher": lambda: dt(tok), "slim": lambda: ds(tok)}, args.rounds, args.repeats)
        pre = interleaved({"teacher": lambda: pt(prompt), "slim": lambda: ps(prompt)}, args.rounds, 3)
    for k in dec:
        dec[k]["tokens_per_s"] = args.batch / (dec[k]["median_ms"] / 1e3)

    data = stdlib_splits(256, 16, eval_sequences=64)
    quality = lm_metrics(teacher, slim, data["test"], torch.device("cpu"))

    ids = torch.tensor([list(b"def main(")], dtype=torch.long)
    with torch.no_grad():
        kw = dict(max_new_tokens=32, do_sample=False, use_cache=True, pad_token_id=256)
        same = torch.equal(slim.generate(ids, **kw), load_slim(args.slim).generate(ids, **kw))
        sample = bytes(int(t) for t in slim.generate(ids, **kw)[0] if int(t) < 256).decode("utf-8", "replace")

    with open(os.path.join(args.teacher, "training.json")) as f:
        training = json.load(f)
    write_result(
        "tiny_llama_prune",
        {
            "decode": {
                "what": f"one decode step, batch {args.batch}, KV cache {args.context} tokens, fp32, "
                f"{args.threads} thread(s), interleaved rounds",
                **dec,
                "speedup": dec["teacher"]["median_ms"] / dec["slim"]["median_ms"],
            },
            "prefill": {
                "what": f"forward of {args.prefill_batch} prompts x {args.context} tokens, fp32",
                **pre,
                "speedup": pre["teacher"]["median_ms"] / pre["slim"]["median_ms"],
            },
            "quality_test_split": quality,
            "params": {
                "teacher": sum(p.numel() for p in teacher.parameters()),
                "slim": sum(p.numel() for p in slim.parameters()),
            },
            "layout": {"teacher": layer_widths(teacher), "slim": layer_widths(slim)},
            "reload_generate_equal": same,
            "slim_sample": sample,
            "teacher_training": {k: v for k, v in training.items() if k != "versions"},
        },
    )


if __name__ == "__main__":
    main()
