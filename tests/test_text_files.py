"""The user's own text (``data.kind: text``): every format read into documents, the split by
document, one-line errors for bad input, and end-to-end runs of a tiny encoder and a tiny decoder
on a folder of text files."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from hawada.cli import main  # noqa: E402
from hawada.config import RecipeError, recipe_from_dict  # noqa: E402
from hawada.data.files import (  # noqa: E402
    Document,
    TextFileError,
    lm_splits,
    passage_corpus,
    read_documents,
    split_documents,
    split_of,
)
from hawada.data.text import TextDataError  # noqa: E402
from hawada.errors import InputError, PathNotFoundError  # noqa: E402
from hawada.jobs import build_job  # noqa: E402
from hawada.jobs.text import packaged_minilm_folder  # noqa: E402
from tests.test_lm_job import small_recipe, tiny_teacher  # noqa: E402

# words the MiniLM WordPiece vocabulary holds whole: passages tokenise to varied real ids
WORD_LIST = (
    "the model reads a long river of text and every word finds its place in a quiet house where "
    "light falls on old books music plays children learn numbers cities grow trees bend wind moves "
    "water runs under bridges people walk to work markets open early bread is warm coffee strong"
)
WORDS = WORD_LIST.split()
CPU = torch.device("cpu")


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def doc_text(i: int, paragraphs: int = 2) -> str:
    rng = random.Random(i)
    return "\n\n".join(" ".join(sentence(rng) for _ in range(3)) for _ in range(paragraphs))


def write_txt_folder(root, n: int, paragraphs: int = 2) -> dict[str, str]:
    """``n`` documents as .txt files in two sub-folders; returns {relative path: text}."""
    out = {}
    for i in range(n):
        rel = f"part{i % 2}/doc{i:03d}.txt"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        out[rel] = doc_text(i, paragraphs)
        path.write_text(out[rel], encoding="utf-8")
    return out


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def check_split(docs: list[Document]) -> dict[str, list[Document]]:
    """The split is disjoint, covers every document, follows the id's hash, and is the same when
    the documents come in another order."""
    parts = split_documents(docs)
    ids = [[d.id for d in parts[s]] for s in ("train", "val", "test")]
    flat = [i for part in ids for i in part]
    assert sorted(flat) == sorted(d.id for d in docs) and len(set(flat)) == len(flat)
    for split, part in parts.items():
        assert all(split_of(d.id) == split for d in part)
    again = split_documents(list(reversed(docs)))
    assert {s: {d.id for d in p} for s, p in again.items()} == {s: set(i) for s, i in zip(parts, ids)}
    return parts


# --- formats ---------------------------------------------------------------------------------


def test_one_txt_file_is_one_document(tmp_path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("First paragraph.\n\nSecond paragraph: ünïcödé.\n", encoding="utf-8")
    docs = read_documents(str(path))
    assert docs == [Document("book.txt", "First paragraph.\n\nSecond paragraph: ünïcödé.\n")]
    parts = check_split(docs)
    assert sum(map(len, parts.values())) == 1


def test_folder_of_txt_files_by_relative_path_and_stable_split(tmp_path) -> None:
    texts = write_txt_folder(tmp_path / "a", 40)
    (tmp_path / "a" / ".hidden.txt").write_text("never read")
    (tmp_path / "a" / "notes.md").write_text("not a text format hawada reads")
    (tmp_path / "a" / "part0" / "blank.txt").write_text("  \n\n ")  # empty documents are dropped
    docs = read_documents(str(tmp_path / "a"))
    assert {d.id: d.text for d in docs} == texts
    assert [d.id for d in docs] == sorted(texts)
    parts = check_split(docs)
    assert all(parts[s] for s in ("train", "val", "test")) and len(parts["train"]) > len(parts["test"])
    # the same documents written in the opposite order, elsewhere, beside 30 new ones: none moves
    b = tmp_path / "b"
    for rel in reversed(sorted(texts)):
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_text(texts[rel], encoding="utf-8")
    for i in range(30):
        (b / f"new{i}.txt").write_text(doc_text(1000 + i))
    moved = {s: [d for d in p if d.id in texts] for s, p in split_documents(read_documents(str(b))).items()}
    assert moved == parts


def test_jsonl_rows_from_data_field(tmp_path) -> None:
    rows = [{"id": i, "body": f"row {i} " + doc_text(i, 1), "text": "not this one"} for i in range(30)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "")  # a blank line is no row, and the row index stays the line index
    lines.append(json.dumps({"body": None, "text": "not this one"}))  # null: an empty document, dropped
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = read_documents(str(path), field="body")
    assert len(docs) == 30
    by_id = {d.id: d.text for d in docs}
    assert by_id["rows.jsonl:0"] == rows[0]["body"] and by_id["rows.jsonl:6"] == rows[5]["body"]
    assert "rows.jsonl:5" not in by_id
    check_split(docs)
    default = read_documents(str(path))  # the default field "text" is another key
    assert len(default) == 31 and {d.text for d in default} == {"not this one"}


def test_csv_column_with_quoted_newlines_a_bom_and_a_long_cell(tmp_path) -> None:
    import csv

    path = tmp_path / "t.csv"
    long = "word " * 40_000  # 200 000 characters: over csv's default cell limit
    with open(path, "w", encoding="utf-8-sig", newline="") as f:  # a spreadsheet's byte-order mark
        w = csv.writer(f)
        w.writerow(["passage", "label"])
        for i in range(25):
            w.writerow([f'doc {i}, "quoted"\n\nsecond paragraph {i}', i])
        w.writerow([long, 25])
    limit = csv.field_size_limit()
    docs = read_documents(str(path), field="passage")
    assert csv.field_size_limit() == limit  # the module's limit is left as it was
    assert [d.id for d in docs] == sorted(f"t.csv:{i}" for i in range(26))
    want = {f'doc {i}, "quoted"\n\nsecond paragraph {i}' for i in range(25)} | {long}
    assert {d.text for d in docs} == want
    check_split(docs)


def test_parquet_column(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [doc_text(i, 1) for i in range(20)]
    pq.write_table(pa.table({"n": list(range(20)), "content": texts}), tmp_path / "d.parquet")
    docs = read_documents(str(tmp_path / "d.parquet"), field="content")
    assert {d.id: d.text for d in docs} == {f"d.parquet:{i}": t for i, t in enumerate(texts)}
    check_split(docs)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    texts = [doc_text(i, 1) for i in range(20)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(20))}).save_to_disk(str(tmp_path / "ds"))
    docs = read_documents(str(tmp_path / "ds"))
    assert {d.id: d.text for d in docs} == {str(i): t for i, t in enumerate(texts)}
    check_split(docs)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"q": texts[:15]}),
            "test": datasets.Dataset.from_dict({"q": texts[15:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = read_documents(str(tmp_path / "dd"), field="q")
    want = {f"train:{i}": t for i, t in enumerate(texts[:15])} | {
        f"test:{i}": t for i, t in enumerate(texts[15:])
    }
    assert {d.id: d.text for d in docs} == want
    check_split(docs)


def test_mixed_folder_reads_every_format(tmp_path) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("a text file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "a json row"}) + "\n")
    (tmp_path / "c.csv").write_text("text\na csv row\n")
    pq.write_table(pa.table({"text": ["a parquet row"]}), tmp_path / "d.parquet")
    docs = read_documents(str(tmp_path))
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt", "a text file"),
        ("c.csv:0", "a csv row"),
        ("d.parquet:0", "a parquet row"),
        ("sub/b.jsonl:0", "a json row"),
    ]


def test_passages_and_token_windows_follow_the_document_split(tmp_path) -> None:
    texts = write_txt_folder(tmp_path, 60, paragraphs=3)
    docs = read_documents(str(tmp_path))
    parts = split_documents(docs)
    corpus = passage_corpus(docs)
    assert corpus.modules == {s: len(p) for s, p in parts.items()}  # every document gives passages
    for split, ps in corpus.splits.items():
        # every passage is a piece of one document of its own split
        own = [" ".join(d.text.split()) for d in parts[split]]
        assert ps and all(any(p in t for t in own) for p in ps)
    small = passage_corpus(docs, max_chars=2000)
    assert 2000 <= sum(small.chars.values()) < sum(corpus.chars.values())
    lm = lm_splits(docs, seq_len=32, batch_size=4, eval_sequences=5)
    assert lm["train"].sequences.shape[1] == 32 and lm["val"].sequences.shape[0] <= 5
    assert lm["test"].sequences.shape[0] == 5  # the eval cap is reached: only what it needs is read
    again = lm_splits(list(reversed(docs)), seq_len=32, batch_size=4, eval_sequences=5)
    for s in lm:
        assert torch.equal(lm[s].sequences, again[s].sequences)
    # the test windows hold test documents only: every run of bytes between BOS/EOS lies in one
    test_docs = [texts[d.id].encode() for d in parts["test"]]
    runs = [b""]
    every = lm_splits(docs, seq_len=32, batch_size=4, eval_sequences=10**6)["test"].sequences
    for t in every.flatten().tolist():
        if t < 256:
            runs[-1] += bytes([t])
        else:
            runs.append(b"")
    runs = [r for r in runs if r]
    assert len(runs) == len(test_docs) and all(any(r in doc for doc in test_docs) for r in runs)


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_input_errors(tmp_path) -> None:
    with pytest.raises(PathNotFoundError, match="data.path: not found") as e:
        read_documents(str(tmp_path / "nowhere"))
    one_line(e)
    with pytest.raises(InputError, match="needs a file or folder") as e:
        read_documents(None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("# not read")
    with pytest.raises(TextFileError, match="no .txt, .jsonl, .csv, .parquet files") as e:
        read_documents(str(tmp_path / "empty"))
    one_line(e)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(
        TextFileError, match=r"data.field 'text' missing in rows.jsonl line 2 \(keys: body\)"
    ) as e:
        read_documents(str(tmp_path / "rows.jsonl"))
    one_line(e)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(TextFileError, match="bad.jsonl line 2 is not valid JSON") as e:
        read_documents(str(tmp_path / "bad.jsonl"))
    one_line(e)
    (tmp_path / "num.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(TextFileError, match="is int, not text"):
        read_documents(str(tmp_path / "num.jsonl"))
    (tmp_path / "t.csv").write_text("title,body\na,b\n")
    with pytest.raises(
        TextFileError, match=r"data.field 'text' is not a column of t.csv \(columns: title, body\)"
    ) as e:
        read_documents(str(tmp_path / "t.csv"))
    one_line(e)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextFileError, match="latin.txt is not UTF-8 text"):
        read_documents(str(tmp_path / "latin.txt"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text('{"text": "   "}\n{"text": null}\n')
    with pytest.raises(TextFileError, match="all 3 documents are empty") as e:
        read_documents(str(tmp_path / "blank"))
    one_line(e)
    (tmp_path / "x.docx").write_text("?")
    with pytest.raises(TextFileError, match=r"unsupported file type \.docx"):
        read_documents(str(tmp_path / "x.docx"))


def test_missing_columns_of_parquet_and_datasets(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(
        TextFileError, match=r"data.field 'text' is not a column of d.parquet \(columns: body\)"
    ) as e:
        read_documents(str(tmp_path / "d.parquet"))
    one_line(e)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(TextFileError, match="junk.parquet is not a readable parquet file") as e:
        read_documents(str(tmp_path / "junk.parquet"))
    one_line(e)
    datasets.Dataset.from_dict({"body": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(TextFileError, match=r"not a column of the dataset \(columns: body\)") as e:
        read_documents(str(tmp_path / "ds"))
    one_line(e)


def test_formats_needing_datasets_name_the_extra_when_it_is_missing(tmp_path, monkeypatch) -> None:
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "d.parquet")
    (tmp_path / "a.txt").write_text("plain text needs nothing")
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is absent
    with pytest.raises(
        TextFileError,
        match=r"reading .parquet files needs the datasets package: pip install 'hawada\[data\]'",
    ) as e:
        read_documents(str(tmp_path / "d.parquet"))
    one_line(e)
    assert read_documents(str(tmp_path / "a.txt"))[0].text == "plain text needs nothing"


def test_splits_too_small_for_their_metrics(tmp_path) -> None:
    # a decoder: two short documents cannot fill one window in every split
    docs = [Document(f"d{i}.txt", "short text") for i in range(3)]
    with pytest.raises(TextFileError, match="fewer than one sequence of data.seq_len=64") as e:
        lm_splits(docs, seq_len=64, batch_size=2)
    one_line(e)
    # an encoder: ten documents leave too few test passages for top-10 retrieval
    write_txt_folder(tmp_path / "few", 10, paragraphs=1)
    r = recipe_from_dict(encoder_recipe(tmp_path, str(tmp_path / "few"), str(tmp_path / "out")))
    with pytest.raises(
        TextDataError, match=r"split has \d+ passages \(need >= 11 for top-10 retrieval; give more documents"
    ) as e:
        build_job(r, CPU)
    one_line(e)


def test_recipe_and_family_checks(tmp_path) -> None:
    base = {"model": {"family": "resnet"}, "data": {"kind": "text"}}
    with pytest.raises(RecipeError, match="data.path: the text data kind needs a file or folder"):
        recipe_from_dict(base)
    (tmp_path / "a.txt").write_text("some text")
    r = recipe_from_dict({**base, "data": {"kind": "text", "path": str(tmp_path / "a.txt"), "field": "body"}})
    assert r.data.field == "body" and recipe_from_dict({}).data.field == "text"
    with pytest.raises(
        InputError, match="data.kind text needs model.family hf_encoder or hf_decoder, got 'resnet'"
    ) as e:
        build_job(r, CPU)
    one_line(e)


def test_cli_exit_code_2_for_a_missing_data_path(tmp_path, capsys) -> None:
    rec = small_recipe(str(tmp_path / "teacher"), str(tmp_path / "out"))
    tiny_teacher(str(tmp_path / "teacher"))
    rec["data"] = {**rec["data"], "kind": "text", "path": str(tmp_path / "no_such_folder")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rec))
    capsys.readouterr()
    assert main(["optimize", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.path: not found" in err and "no_such_folder" in err
    assert not (tmp_path / "out").exists()


# --- end to end ------------------------------------------------------------------------------


def tiny_encoder(root) -> str:
    """A random two-layer BERT with the packaged MiniLM's tokenizer files (vocabulary 30522)."""
    folder = root / "encoder"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    transformers.BertModel(cfg).save_pretrained(str(folder))
    src = packaged_minilm_folder()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), folder / f)
    return str(folder)


def encoder_recipe(root, data_path: str, out: str) -> dict:
    model = root / "encoder"
    return {
        "name": "text-encoder",
        "progress": False,
        "threads": 1,
        "model": {
            "family": "hf_encoder",
            "arch": "bert",
            "path": str(model) if model.exists() else tiny_encoder(root),
        },
        "data": {"kind": "text", "path": data_path, "seq_len": 32, "batch_size": 4},
        "gates": {"group_size": {"head": 1, "ffn": 16}, "min_keep": {"head": 1, "ffn": 1}},
        "train": {"steps": 2, "probe_every": 0},
        "target": {"latency_ms": 1.0e6, "batch_size": 4},  # timings of a tiny model are noise
        "proxy": {"mode": "analytic", "calib_points": 2},
        "search": {"multiples": [1], "modes": ["floor"]},
        "finetune": {"steps": 1, "eval_every": 1, "bn_recalib_batches": 0},
        "measure": {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "budget_s": 0.05},
        "output": {"dir": out, "plot": False},
    }


def test_encoder_optimize_on_a_folder_of_text(tmp_path) -> None:
    from hawada.run import optimize

    torch.set_num_threads(1)
    texts = write_txt_folder(tmp_path / "corpus", 120)
    out = tmp_path / "run"
    recipe = recipe_from_dict(encoder_recipe(tmp_path, str(tmp_path / "corpus"), str(out)))
    rep = optimize(recipe, log=lambda s: None)
    assert rep["family"] == "hf_encoder" and rep["job"]["data"] == "text"
    assert sum(rep["job"]["documents"].values()) == len(texts)
    assert rep["job"]["passages"]["test"] >= 11
    agreement = rep["agreement"]
    assert set(agreement) == {"mean_cosine", "retrieval_top1", "retrieval_top10"}
    # a target far above keep-all and three steps from the teacher's weights: the student is still
    # close to the teacher on the held-out documents
    assert agreement["mean_cosine"] > 0.5 and 0.0 <= agreement["retrieval_top10"] <= 1.0
    assert (out / "report.json").is_file() and (out / "slim" / "tokenizer.json").is_file()


def test_decoder_optimize_on_a_folder_of_text(tmp_path) -> None:
    from hawada.run import optimize

    torch.set_num_threads(1)
    tiny_teacher(str(tmp_path / "t"), tie=False)
    texts = write_txt_folder(tmp_path / "corpus", 40)
    out = str(tmp_path / "run")
    rec = small_recipe(str(tmp_path / "t"), out)
    rec["data"] = {"kind": "text", "path": str(tmp_path / "corpus"), "seq_len": 16, "batch_size": 2}
    rep = optimize(recipe_from_dict(rec), log=lambda s: None)
    assert rep["family"] == "hf_decoder" and rep["job"]["data"] == "text"
    assert rep["job"]["documents"] == len(texts) and rep["job"]["tokenizer"] == "bytes"
    agreement = rep["agreement"]
    for k in ("teacher_ppl", "student_ppl", "ppl_ratio", "top1_agreement", "tokens"):
        assert k in agreement, k
    assert agreement["tokens"] > 0 and agreement["teacher_ppl"] > 1.0
    assert agreement["top1_agreement"] > 0.5  # a few steps from the teacher's weights
