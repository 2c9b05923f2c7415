"""The docstring corpus, tokenisation, the text job's errors, and a smoke run of the MiniLM recipe
with the real packaged weights."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import hawada
from hawada.config import load_recipe
from hawada.data.text import (
    TextBatches,
    TextDataError,
    Tokenized,
    build_corpus,
    check_tokenizer_folder,
    passages,
    split_of,
)
from hawada.jobs.text import build_text_job, packaged_minilm_folder
from hawada.run.report import deployed_form
from tests.helpers import rerandomized

RECIPE = os.path.join(os.path.dirname(__file__), "..", "recipes", "cpu", "minilm-l6.yaml")


def write_pkg(root, files: dict[str, str]) -> str:
    for rel, src in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(src)
    return str(root)


def test_passages_split_long_docstrings_at_paragraphs() -> None:
    doc = "\n\n".join(f"Paragraph {i} " + "word " * 40 for i in range(6))
    ps = passages(doc, max_chars=300)
    assert len(ps) >= 3
    assert all(40 <= len(p) <= 300 for p in ps)
    assert " ".join(ps).split() == doc.split()  # nothing lost, nothing invented
    assert passages("too short") == []


def test_corpus_is_split_by_module_and_deterministic(tmp_path) -> None:
    files = {
        f"pkg{i}/mod{j}.py": f'"""Module pkg{i}.mod{j} docstring that is long enough to be a passage."""\n'
        f'def f():\n    """Function pkg{i}.mod{j} documentation, also long enough to count."""\n'
        for i in range(6)
        for j in range(5)
    }
    files["broken.py"] = "def (:\n"  # unparsable files are skipped
    root = write_pkg(tmp_path, files)
    a = build_corpus(max_chars=10**6, root=root)
    b = build_corpus(max_chars=10**6, root=root)
    assert a.splits == b.splits
    assert sum(a.modules.values()) == 30
    for split, ps in a.splits.items():
        for p in ps:
            mod = p.split()[1].rstrip(".")  # "pkg3.mod1" from the text itself
            assert split_of(mod) == split
    small = build_corpus(max_chars=1000, root=root)
    assert sum(small.chars.values()) < sum(a.chars.values())


def test_empty_corpus_and_missing_tokenizer_are_one_line_errors(tmp_path) -> None:
    root = write_pkg(tmp_path / "src", {"a.py": "x = 1\n"})
    with pytest.raises(TextDataError, match="no docstring passages"):
        build_corpus(root=root)
    empty = tmp_path / "model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files") as e:
        check_tokenizer_folder(str(empty))
    assert "\n" not in str(e.value)


def test_text_too_short_for_a_batch() -> None:
    data = Tokenized(torch.ones(3, 8, dtype=torch.long), torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TextDataError, match="text too short for one batch"):
        TextBatches(data, batch_size=4)


def test_batches_are_full_trimmed_and_cover_each_passage_once() -> None:
    n, L = 37, 16
    lengths = torch.randint(2, L + 1, (n,))
    mask = (torch.arange(L).view(1, -1) < lengths.view(-1, 1)).long()
    ids = torch.arange(n).view(-1, 1).expand(n, L).clone()
    tb = TextBatches(Tokenized(ids, mask), batch_size=5, pool=3)
    seen = []
    for b in tb:
        assert b["input_ids"].shape[0] == 5
        assert b["attention_mask"].shape[1] == int(b["attention_mask"].sum(1).max())
        seen += b["input_ids"][:, 0].tolist()
    assert len(seen) == len(set(seen)) == 35


def test_job_refuses_a_model_folder_without_tokenizer(tmp_path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    src = packaged_minilm_folder()
    shutil.copy(os.path.join(src, "config.json"), folder / "config.json")
    r = load_recipe(RECIPE, [f"model.path={folder}"])
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        build_text_job(r, torch.device("cpu"))


def smoke_overrides(out) -> list[str]:
    """``--set`` items that shorten the MiniLM recipe to a seconds-long run writing into ``out``."""
    return [
        "data.max_chars=250000",
        "data.seq_len=32",
        "target.batch_size=4",
        "train.steps=3",
        "train.probe_every=3",
        "train.target_ramp_steps=2",
        "finetune.steps=2",
        "finetune.eval_every=2",
        "proxy.calib_points=2",
        "measure.warmup=1",
        "measure.min_repeats=2",
        "measure.max_repeats=3",
        "measure.budget_s=0.2",
        "progress=false",
        "threads=1",
        f"output.dir={out}",
    ]


def test_minilm_recipe_smoke_run(tmp_path) -> None:
    """A few steps of the real recipe on the packaged MiniLM weights, end to end."""
    from hawada.run import optimize

    torch.set_num_threads(1)
    out = tmp_path / "run"
    r = load_recipe(RECIPE, smoke_overrides(out))
    report = optimize(r, log=lambda s: None)
    agreement = report["agreement"]
    assert set(agreement) == {"mean_cosine", "retrieval_top1", "retrieval_top10"}
    assert report["family"] == "hf_encoder"
    assert report["job"]["passages"]["train"] > 100
    lay = report["layout"]["slim"]
    assert len(lay["layers"]) == 6 and lay["head_dim"] == 32
    for f in (
        "report.json",
        "metrics.jsonl",
        "slim/model.safetensors",
        "slim/layout.json",
        "slim/tokenizer.json",
    ):
        assert (out / f).is_file(), f
    with open(out / "report.json") as f:
        assert json.load(f)["latency"]["base"]["shapes"] == [[4, 32], [4, 32]]
    slim = hawada.load_slim(str(out / "slim"))
    assert type(slim).__name__ == "BertModel"
    x = {
        "input_ids": torch.tensor([[101, 2023, 2003, 102]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    with torch.no_grad():
        assert slim(**x).last_hidden_state.shape == (1, 4, 384)
    # the saved model is the one the report scored: the same agreement on the test split, in the
    # runtime the recipe deploys to (the demo's: int8, its weights derived from the saved fp32 ones)
    job = build_text_job(r, torch.device("cpu"))
    runtime = report["agreement_measured_in"]
    assert runtime == r.measure.runtime and (out / "slim" / "runtimes.json").is_file()
    again = job.evaluate(job.teacher, deployed_form(slim, runtime, job.latency_inputs), "test")
    for k in agreement:
        assert again[k] == pytest.approx(agreement[k], abs=1e-5), k
    # the scale: the teacher against itself agrees exactly; the slim student (pruned from the
    # teacher's weights to half its latency, two fine-tuning steps) is far above its architecture
    # with the weights redrawn at random (whose embeddings are unrelated to the teacher's)
    itself = job.evaluate(job.teacher, job.teacher, "test")
    assert itself["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and itself["retrieval_top1"] == 1.0
    chance = job.evaluate(job.teacher, rerandomized(slim), "test")
    assert agreement["mean_cosine"] > 0.3 and abs(chance["mean_cosine"]) < 0.15
    assert agreement["retrieval_top10"] > chance["retrieval_top10"] + 0.1


def test_set_dropout_reaches_every_dropout_and_the_config() -> None:
    from transformers import BertConfig, BertModel

    from hawada.jobs.text import set_dropout

    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    model = BertModel(cfg).train()
    n = sum(isinstance(m, torch.nn.Dropout) for m in model.modules())
    assert n > 0 and set_dropout(model, 0.0) == n
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.hidden_dropout_prob == 0.0 and model.config.attention_probs_dropout_prob == 0.0
    x = torch.randint(0, 50, (2, 7))
    assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)  # train mode, deterministic
