"""LM job: corpus splits, what is timed, distillation mask, bad inputs, and a pipeline smoke run."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hawada.adapters.hf_decoder import CheckpointError, VocabMismatchError, layer_widths  # noqa: E402
from hawada.config import recipe_from_dict  # noqa: E402
from hawada.core.distill import kd_loss  # noqa: E402
from hawada.data.lm import BOS, EOS, VOCAB_SIZE, decode, encode, split_tokens, stdlib_files  # noqa: E402
from hawada.jobs.lm import DecodeStep, PrefillDecode, build_lm_job  # noqa: E402
from tests.helpers import rerandomized  # noqa: E402


def tiny_teacher(
    path: str, vocab: int = VOCAB_SIZE, tie: bool = True, dtype: torch.dtype | None = None
) -> None:
    """A random two-layer Llama. Tied embeddings make a random model predict its input token
    again (the largest logit is the token's own embedding); ``tie=False`` gives predictions that
    depend on the weights."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(cfg)
    (model.to(dtype) if dtype is not None else model).save_pretrained(path)


def small_recipe(path: str, out: str, **target) -> dict:
    return {
        "name": "lm-smoke",
        "progress": False,
        "threads": 1,
        "model": {"family": "hf_decoder", "arch": "llama", "path": path},
        "data": {"kind": "stdlib_source", "seq_len": 16, "batch_size": 2, "max_chars": 20000},
        "gates": {"group_size": {"ffn": 16}, "min_keep": {"head": 1, "kv_group": 1}},
        "train": {"steps": 2, "probe_every": 0},
        "target": {"latency_ms": 1.0e6, "phase": "decode", "batch_size": 2, "context_len": 8, **target},
        "proxy": {"mode": "analytic", "calib_points": 2},
        "search": {"multiples": [1], "modes": ["floor"]},
        "finetune": {"steps": 1, "eval_every": 1, "bn_recalib_batches": 0},
        "measure": {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "budget_s": 0.05},
        "output": {"dir": out, "plot": False},
    }


def test_splits_are_deterministic_and_disjoint():
    a, b = stdlib_files(), stdlib_files()
    assert a == b
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert len(a["test"]) > 5
    t = split_tokens("test", max_chars=5000)
    assert t[0] == BOS and int(t.max()) <= EOS
    assert decode(encode("déf x")) == "déf x"


def test_decode_step_times_the_same_step_each_call(tmp_path):
    tiny_teacher(str(tmp_path / "t"))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "t")).eval()
    step = DecodeStep(m, 2, 10)
    ids = torch.ones(2, 1, dtype=torch.long)
    with torch.no_grad():
        first = step(ids)
        second = step(ids)
    assert step.cache.get_seq_length() == 11  # cropped back to 10, then one token appended
    assert torch.equal(first, second)
    with torch.no_grad():
        out = PrefillDecode(m, 3)(torch.ones(2, 5, dtype=torch.long))
    assert out.shape == (2, 3)


def test_kd_loss_uses_every_masked_position():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    full = kd_loss(s, t, 1.0, mask, chunk_tokens=3)
    rows = kd_loss(s.reshape(10, 7)[mask.reshape(-1).bool()], t.reshape(10, 7)[mask.reshape(-1).bool()], 1.0)
    assert torch.allclose(full, rows, atol=1e-6)


def test_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    r = recipe_from_dict(small_recipe(str(tmp_path / "empty"), str(tmp_path / "o")))
    with pytest.raises(CheckpointError, match="has no config.json"):
        build_lm_job(r, torch.device("cpu"))
    tiny_teacher(str(tmp_path / "small"), vocab=128)
    r = recipe_from_dict(small_recipe(str(tmp_path / "small"), str(tmp_path / "o")))
    with pytest.raises(VocabMismatchError, match="model vocabulary has 128 tokens"):
        build_lm_job(r, torch.device("cpu"))


def test_pipeline_smoke(tmp_path):
    from hawada.run import optimize
    from hawada.slim_io import load_slim

    tiny_teacher(str(tmp_path / "t"), tie=False)
    out = str(tmp_path / "run")
    recipe = recipe_from_dict(small_recipe(str(tmp_path / "t"), out))
    rep = optimize(recipe, log=lambda s: None)
    assert rep["family"] == "hf_decoder"
    assert rep["latency"]["slim"]["shapes"] == [[2, 1]]  # one decode step of 2 sequences
    slim = load_slim(os.path.join(out, "slim"))
    assert layer_widths(slim) == rep["layout"]["slim"]["layers"]
    # the saved model is the one the report scored: the same perplexity and agreement on the test split
    job = build_lm_job(recipe, torch.device("cpu"))
    agreement = rep["agreement"]
    again = job.evaluate(job.teacher, slim, "test")
    assert again["tokens"] == agreement["tokens"] > 0
    for k in ("teacher_ppl", "student_ppl", "ppl_ratio", "top1_agreement"):
        assert again[k] == pytest.approx(agreement[k], rel=1e-5), k
    assert agreement["ppl_ratio"] == pytest.approx(agreement["student_ppl"] / agreement["teacher_ppl"])
    # the scale: the teacher against itself agrees exactly; the slim student (a short distillation
    # from the teacher's weights) stays close to it, far above the same architecture with its
    # weights redrawn at random (perplexity does not tell them apart: a random teacher's is about
    # the vocabulary size, and so is theirs)
    itself = job.evaluate(job.teacher, job.teacher, "test")
    assert itself["top1_agreement"] == 1.0 and itself["ppl_ratio"] == 1.0
    assert itself["teacher_ppl"] == pytest.approx(agreement["teacher_ppl"], rel=1e-6)
    chance = job.evaluate(job.teacher, rerandomized(slim), "test")
    assert agreement["top1_agreement"] > 0.8 and chance["top1_agreement"] < 0.3
    # TensorBoard scalars (tensorboard is a dev requirement): losses, lambda, latency, kept fractions
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "gates/kd",
        "gates/lambda",
        "gates/proxy_ms",
        "gates/kept",
        "gates/kept_head",
        "finetune/kd",
    } <= tags
    assert [e.step for e in acc.Scalars("gates/lambda")] == [1, 2]
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["job"]["timed"]["phase"] == "decode"


def test_hidden_state_mse_masks_padding():
    from hawada.core.distill import hidden_state_mse

    t = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    s = [torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    s[1][1, 2] = 10.0  # a padded position: ignored
    s[0][0, 0] = 2.0  # a real one: (4 * 4) / (5 tokens * 4 dims) = 0.8 on layer 0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert torch.allclose(hidden_state_mse(s, t, mask), torch.tensor(0.4))
    with pytest.raises(ValueError, match="same, non-zero number"):
        hidden_state_mse(s, t[:1])
