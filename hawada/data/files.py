"""The user's own text (``data.kind: text``): documents read from files, split by document.

``data.path`` is a file or a folder. A folder is walked recursively (hidden entries skipped) for
``.txt``, ``.jsonl``, ``.csv`` and ``.parquet`` files; a folder written by ``datasets``'
``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``) is read as one dataset. A document is one
``.txt`` file, or one row of a ``.jsonl``/``.csv``/``.parquet`` file or of a dataset; the text of
a row is its ``data.field`` value (column or JSON key).

Every document has an id that does not depend on where the data sits or on the order of its
files: the path relative to ``data.path`` (``/``-separated; the file's name when ``data.path`` is a
file), ``:<row>`` for a row (``<split>:<row>`` for a dataset's rows). The train / val / test split
is a hash of that id (80/10/10, the rule of the docstring corpus: :func:`hawada.data.text.split_of`),
so adding, renaming or reordering other files never moves a document.

``.txt``, ``.jsonl`` and ``.csv`` need only the standard library; ``.parquet`` and ``save_to_disk``
folders need the ``datasets`` package (the ``hawada[data]`` extra), imported only for them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hawada.data.lm import LMBatches, Tokenizer
from hawada.data.text import Corpus, collect_passages, passages, split_of
from hawada.errors import InputError, PathNotFoundError

SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
SPLITS = ("train", "val", "test")
DATASET_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes beside the arrow files
EXTRA = "pip install 'hawada[data]'"


class TextFileError(InputError):
    """User text that cannot be read or split into the documents a run needs."""


@dataclass(frozen=True)
class Document:
    """One document: its stable id and its text."""

    id: str
    text: str


def order_key(doc: Document) -> tuple[int, str]:
    """A spread-out visiting order that depends on the id alone (what ``data.max_chars`` keeps)."""
    return int.from_bytes(hashlib.sha1(("order:" + doc.id).encode("utf-8")).digest()[:8], "big"), doc.id


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in DATASET_MARKERS)


def text_files(root: str) -> list[str]:
    """Sorted ``/``-separated paths, relative to ``root``, of the readable files under it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if not fn.startswith(".") and fn.lower().endswith(SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/"))
    return sorted(out)


def _need_datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise TextFileError(f"reading {what} needs the datasets package: {EXTRA}") from None
    return datasets


def _row_text(value, field: str, where: str) -> str:
    if value is None:  # a null cell is an empty document
        return ""
    if not isinstance(value, str):
        raise TextFileError(f"data.field {field!r} of {where} is {type(value).__name__}, not text")
    return value


def _read_txt(path: str, rel: str) -> Iterator[Document]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            yield Document(rel, f.read())
    except UnicodeDecodeError:
        raise TextFileError(f"{rel} is not UTF-8 text") from None


def _read_jsonl(path: str, rel: str, field: str) -> Iterator[Document]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise TextFileError(f"{rel} is not UTF-8 text") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue  # blank lines separate nothing; the row index stays the line index
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TextFileError(f"{rel} line {i + 1} is not valid JSON") from None
        if not isinstance(row, dict):
            raise TextFileError(f"{rel} line {i + 1} is a JSON {type(row).__name__}, not an object")
        if field not in row:
            keys = ", ".join(sorted(row)) or "none"
            raise TextFileError(f"data.field {field!r} missing in {rel} line {i + 1} (keys: {keys})")
        yield Document(f"{rel}:{i}", _row_text(row[field], field, f"{rel} line {i + 1}"))


def _read_csv(path: str, rel: str, field: str) -> Iterator[Document]:
    # csv refuses cells over 128 KiB by default; a document may be a whole article
    limit = csv.field_size_limit(2**31 - 1)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or field not in reader.fieldnames:
                cols = ", ".join(reader.fieldnames or []) or "none"
                raise TextFileError(f"data.field {field!r} is not a column of {rel} (columns: {cols})")
            rows = [row[field] for row in reader]
    except UnicodeDecodeError:
        raise TextFileError(f"{rel} is not UTF-8 text") from None
    except csv.Error as e:
        raise TextFileError(f"{rel} is not valid CSV: {e}") from None
    finally:
        csv.field_size_limit(limit)
    for i, text in enumerate(rows):
        yield Document(f"{rel}:{i}", text or "")


def _check_column(field: str, columns: list[str], where: str) -> None:
    if field not in columns:
        raise TextFileError(
            f"data.field {field!r} is not a column of {where} (columns: {', '.join(columns) or 'none'})"
        )


def _read_parquet(path: str, rel: str, field: str) -> Iterator[Document]:
    _need_datasets(".parquet files")
    import pyarrow.parquet as pq  # a dependency of datasets

    try:
        names = list(pq.read_schema(path).names)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise TextFileError(f"{rel} is not a readable parquet file: {str(e).splitlines()[0]}") from None
    _check_column(field, names, rel)
    values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    for i, v in enumerate(values):
        yield Document(f"{rel}:{i}", _row_text(v, field, f"{rel} row {i}"))


def _read_saved_dataset(path: str, field: str) -> Iterator[Document]:
    datasets = _need_datasets("a save_to_disk dataset")
    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:
        raise TextFileError(f"{path} is not a readable datasets folder: {str(e).splitlines()[0]}") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    # a DatasetDict's own splits are merged and split again by document id, like every other source
    for name, ds in sorted(parts):
        where = f"dataset split {name!r}" if name else "the dataset"
        _check_column(field, list(ds.column_names), where)
        values = ds[field]
        prefix = f"{name}:" if name else ""
        for i, v in enumerate(values):
            yield Document(f"{prefix}{i}", _row_text(v, field, f"{where} row {i}"))


def _read_file(path: str, rel: str, field: str) -> Iterator[Document]:
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        return _read_txt(path, rel)
    if suffix == ".jsonl":
        return _read_jsonl(path, rel, field)
    if suffix == ".csv":
        return _read_csv(path, rel, field)
    if suffix == ".parquet":
        return _read_parquet(path, rel, field)
    raise TextFileError(
        f"data.path {path}: unsupported file type {suffix or '(none)'} (use {', '.join(SUFFIXES)})"
    )


def read_documents(path: str | None, field: str = "text") -> list[Document]:
    """Every non-empty document under ``path`` (a file, a folder of files, or a saved dataset), in
    id order.

    Raises :class:`TextFileError` (or :class:`~hawada.errors.PathNotFoundError`) with one line
    when the path is missing, holds no readable file, lacks ``field``, or when every document is empty.
    """
    if not path:
        raise TextFileError("data.path: the text data kind needs a file or folder of text")
    if not os.path.exists(path):
        raise PathNotFoundError(f"data.path: not found: {path}")
    docs: list[Document] = []
    if is_saved_dataset(path):
        docs.extend(_read_saved_dataset(path, field))
    elif os.path.isdir(path):
        rels = text_files(path)
        if not rels:
            raise TextFileError(
                f"data.path {path}: no {', '.join(SUFFIXES)} files and no save_to_disk dataset in the folder"
            )
        for rel in rels:
            docs.extend(_read_file(os.path.join(path, rel), rel, field))
    else:
        docs.extend(_read_file(path, os.path.basename(path), field))
    if not docs:
        raise TextFileError(f"data.path {path}: no documents (the files hold no rows)")
    kept = [d for d in docs if d.text.strip()]
    if not kept:
        raise TextFileError(f"data.path {path}: all {len(docs)} documents are empty")
    return sorted(kept, key=lambda d: d.id)


def split_documents(docs: list[Document]) -> dict[str, list[Document]]:
    """``{"train", "val", "test"} -> documents`` by :func:`split_of` of each id (the input order kept)."""
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d in docs:
        out[split_of(d.id)].append(d)
    return out


def passage_corpus(docs: list[Document], max_chars: int | None = None, root: str = "") -> Corpus:
    """Passages (at most 600 characters, cut at paragraph breaks) of every document, by split.

    Documents are visited in :func:`order_key` order until ``max_chars`` characters are collected
    (None: all of them). ``Corpus.modules`` counts documents.
    """
    budget = float("inf") if max_chars is None else int(max_chars)
    # a short row (a title, a query) is a passage too: the docstring corpus's 40-character floor
    # only drops boilerplate
    units = ((split_of(d.id), passages(d.text, min_chars=1)) for d in sorted(docs, key=order_key))
    return collect_passages(units, budget, root)


def _tokens(docs: list[Document], tokenizer: Tokenizer, max_chars: float, max_tokens: float) -> torch.Tensor:
    """``[N]`` long: documents as ``BOS tokens EOS``, concatenated, until a cap is reached."""
    parts: list[torch.Tensor] = []
    chars = tokens = 0
    for d in docs:
        if chars >= max_chars or tokens >= max_tokens:
            break
        data = d.text.encode("utf-8")
        parts.append(tokenizer.encode_file(data))
        chars, tokens = chars + len(data), tokens + parts[-1].numel()
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def lm_splits(
    docs: list[Document],
    seq_len: int,
    batch_size: int,
    max_chars: int | None = None,
    eval_sequences: int = 64,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> dict[str, LMBatches]:
    """Train / val / test batches of ``[seq_len]`` token windows of the documents of each split.

    Documents are concatenated in :func:`order_key` order; ``max_chars`` caps the train split's
    bytes (whole documents). Val and test keep at most ``eval_sequences`` windows (only the text
    they need is tokenised). Raises :class:`TextFileError` when a split has fewer tokens than one
    window.
    """
    tokenizer = tokenizer or Tokenizer()
    by_split = split_documents(sorted(docs, key=order_key))
    inf = float("inf")
    out: dict[str, LMBatches] = {}
    for split, part in by_split.items():
        train = split == "train"
        cap_chars = inf if max_chars is None or not train else max_chars
        cap_tokens = inf if train else eval_sequences * seq_len
        toks = _tokens(part, tokenizer, cap_chars, cap_tokens)
        n = toks.numel() // seq_len
        if n < 1:
            raise TextFileError(
                f"the {split} split ({len(part)} of {len(docs)} documents) has {toks.numel()} tokens, "
                f"fewer than one sequence of data.seq_len={seq_len}: give more text or lower data.seq_len"
            )
        seqs = toks[: n * seq_len].view(n, seq_len)
        if train:
            out[split] = LMBatches(seqs, batch_size, shuffle=True, seed=seed)
        else:
            out[split] = LMBatches(seqs[:eval_sequences], min(batch_size, 16))
    return out
