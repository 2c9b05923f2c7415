"""Text data: passages from the standard library's docstrings, split by module, and tokenisation.

The corpus is built from the running interpreter's standard library (nothing is downloaded):
every ``.py`` file under ``sysconfig``'s stdlib path is parsed with :mod:`ast`; module, class and
function docstrings are cleaned and cut into passages at paragraph boundaries. Modules are taken
in the order of a hash of their dotted name (a deterministic, spread-out sample) until the
character budget is reached, and each module goes wholly to train, val or test by that hash.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from hawada.errors import InputError, PathNotFoundError

DEFAULT_MAX_CHARS = 1_700_000
MIN_PASSAGE_CHARS = 40
MAX_PASSAGE_CHARS = 600
SPLIT_PERCENT = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "spiece.model", "vocab.json")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}


class TextDataError(InputError):
    """A corpus or tokenizer that cannot give the batches a run needs."""


def _hash(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


def split_of(module: str) -> str:
    """``train``/``val``/``test`` for a dotted module name (stable across machines)."""
    pct = _hash("split:" + module) % 100
    for split, (lo, hi) in SPLIT_PERCENT.items():
        if lo <= pct < hi:
            return split
    raise AssertionError(pct)


def stdlib_modules(root: str | None = None) -> list[tuple[str, str]]:
    """``(dotted module name, file path)`` of every ``.py`` file under ``root`` (default: stdlib)."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise TextDataError(f"standard library folder not found: {root}")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[: -len(".__init__")]
            out.append((rel, path))
    return out


def docstrings(source: str) -> Iterator[str]:
    """Cleaned module, class and function docstrings of one source file (parse order)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield inspect.cleandoc(doc)


def passages(doc: str, max_chars: int = MAX_PASSAGE_CHARS, min_chars: int = MIN_PASSAGE_CHARS) -> list[str]:
    """Cut one docstring into passages of at most ``max_chars`` at paragraph (then line) breaks."""
    out: list[str] = []
    cur = ""
    pieces: list[str] = []
    for para in doc.split("\n\n"):
        para = para.strip()
        if len(para) <= max_chars:
            pieces.append(para)
        else:
            pieces.extend(line for line in para.split("\n"))
    for piece in pieces:
        piece = " ".join(piece.split())
        while len(piece) > max_chars:  # a single very long line: cut at a space
            cut = piece.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                out.append(cur)
                cur = ""
            out.append(piece[:cut])
            piece = piece[cut:].strip()
        if not piece:
            continue
        if cur and len(cur) + 1 + len(piece) > max_chars:
            out.append(cur)
            cur = piece
        else:
            cur = f"{cur} {piece}" if cur else piece
    if cur:
        out.append(cur)
    return [p for p in out if len(p) >= min_chars]


@dataclass
class Corpus:
    """Passages per split and where they came from."""

    splits: dict[str, list[str]]
    modules: dict[str, int]
    chars: dict[str, int]
    root: str
    info: dict = field(default_factory=dict)


def collect_passages(units: Iterable[tuple[str, Iterable[str]]], budget: float, root: str) -> Corpus:
    """Passages of ``(split, passages)`` units (modules, documents), visited in the given order
    until ``budget`` characters are collected.

    A passage seen before is dropped: repeated boilerplate would otherwise leak across splits.
    ``Corpus.modules`` counts the units that gave at least one passage, per split.
    """
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    modules = {k: 0 for k in splits}
    chars = {k: 0 for k in splits}
    total = 0
    seen: set[str] = set()
    for split, ps in units:
        if total >= budget:
            break
        got = 0
        for p in ps:
            if p in seen:
                continue
            seen.add(p)
            splits[split].append(p)
            chars[split] += len(p)
            got += len(p)
        if got:
            modules[split] += 1
            total += got
    return Corpus(splits, modules, chars, root)


def _module_passages(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
    except (UnicodeDecodeError, OSError):
        return
    for doc in docstrings(src):
        yield from passages(doc)


def build_corpus(max_chars: int | None = None, root: str | None = None) -> Corpus:
    """Docstring passages of the standard library (or of the ``.py`` files under ``root``).

    Modules are visited in hash order until ``max_chars`` characters of passages are collected.
    Raises :class:`TextDataError` when no passage is found.
    """
    budget = DEFAULT_MAX_CHARS if max_chars is None else int(max_chars)
    mods = stdlib_modules(root)
    mods.sort(key=lambda m: (_hash("order:" + m[0]), m[0]))
    units = ((split_of(name), _module_passages(path)) for name, path in mods)
    corpus = collect_passages(units, budget, root or sysconfig.get_paths()["stdlib"])
    if sum(corpus.chars.values()) == 0:
        raise TextDataError(f"no docstring passages found under {root or 'the standard library'}")
    return corpus


def check_tokenizer_folder(path: str) -> None:
    """One-line error when ``path`` has no tokenizer files."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise PathNotFoundError(
            f"model folder {path} has no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})"
        )


def load_tokenizer(path: str):
    """The folder's tokenizer, from local files only."""
    check_tokenizer_folder(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@dataclass
class Tokenized:
    """``input_ids``/``attention_mask`` ``[N, seq_len]`` (right-padded) of N passages."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``idx`` trimmed to their longest real length (padding beyond it is never read)."""
        m = self.attention_mask[idx]
        n = int(m.sum(1).max())
        return {"input_ids": self.input_ids[idx, :n], "attention_mask": m[:, :n]}


def tokenize(tokenizer, texts: list[str], seq_len: int) -> Tokenized:
    """``[N, seq_len]`` ids and mask of N passages (truncated, right-padded); N may be 0."""
    if not texts:  # a fast tokenizer fails on an empty batch
        empty = torch.zeros(0, seq_len, dtype=torch.long)
        return Tokenized(empty, empty.clone())
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return Tokenized(enc["input_ids"], enc["attention_mask"])


class TextBatches:
    """Shuffled batches over a :class:`Tokenized` set; a new order each pass, seeded.

    Only full batches are yielded (every step sees ``batch_size`` passages). Within pools of
    ``pool`` batches, passages are grouped by length, so a batch is trimmed to little padding
    (training cost follows the real token count); the order of the batches is shuffled again.
    """

    def __init__(
        self, data: Tokenized, batch_size: int, seed: int = 0, shuffle: bool = True, pool: int = 50
    ) -> None:
        if len(data) < batch_size:
            raise TextDataError(
                f"text too short for one batch: {len(data)} training passages < batch size {batch_size}"
            )
        self.data, self.batch_size, self.shuffle, self.pool = data, batch_size, shuffle, pool
        self.seed, self.epoch = seed, 0
        self.lengths = data.attention_mask.sum(1)

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """The next pass yields epoch ``epoch``'s order (a function of seed and epoch alone)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n, bs = len(self.data), self.batch_size
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order[: len(self) * bs]
        batches = []
        for start in range(0, order.numel(), bs * self.pool):
            chunk = order[start : start + bs * self.pool]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches.extend(chunk[j : j + bs] for j in range(0, chunk.numel(), bs))
        perm = torch.randperm(len(batches), generator=gen) if self.shuffle else range(len(batches))
        for j in perm:
            yield self.data.batch(batches[int(j)])
