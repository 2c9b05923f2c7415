"""A byte-level language-modelling corpus: the Python standard library's own source text.

Nothing is downloaded: the text is the ``.py`` files of the running interpreter's standard
library (tests and site-packages excluded). Files are split into train / val / test by a
deterministic hash of their path relative to the library root, so held-out modules are the
same on every machine with the same Python version and are never seen in training.

Tokens are bytes (0..255) plus three specials: ``PAD`` 256, ``BOS`` 257, ``EOS`` 258
(vocabulary 259). Batches are dicts ``{"input_ids": [B, L] long, "attention_mask": [B, L] long}``.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass

import torch

from hawada.errors import InputError

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
SPLITS = ("train", "val", "test")


class DataError(InputError):
    """A corpus that cannot be built (no files, too little text)."""


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def split_of(relpath: str) -> str:
    """``'test'`` for ~5% of modules, ``'val'`` for ~5%, else ``'train'`` (crc32 of the path)."""
    h = zlib.crc32(relpath.replace(os.sep, "/").encode()) % 20
    return "test" if h == 0 else "val" if h == 1 else "train"


def stdlib_files(root: str | None = None) -> dict[str, list[str]]:
    """Sorted relative paths of the library's ``.py`` files, by split."""
    root = root or stdlib_root()
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = rel_dir.split(os.sep)
        # tests are huge and repetitive; site-packages is not the standard library
        if any(p in ("site-packages", "test", "tests", "idle_test", "__pycache__") for p in parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                rel = os.path.normpath(os.path.join(rel_dir, fn))
                out[split_of(rel)].append(rel)
    if not out["train"] or not out["test"]:
        raise DataError(f"no standard-library source found under {root}")
    return out


def encode(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids."""
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    """Token ids back to text (specials dropped, invalid UTF-8 replaced)."""
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class Tokenizer:
    """Text -> ids. Default: bytes with the specials above. ``from_folder`` uses the tokenizer a
    model folder ships (``tokenizer.json`` / ``tokenizer_config.json``), with its BOS/EOS."""

    def __init__(
        self, encode_fn=None, bos: int | None = BOS, eos: int | None = EOS, vocab_size: int = VOCAB_SIZE
    ):
        self.encode_fn, self.bos, self.eos, self.vocab_size = encode_fn, bos, eos, vocab_size

    @classmethod
    def from_folder(cls, path: str) -> Tokenizer | None:
        """The folder's packaged tokenizer, or None when it ships none."""
        if not any(
            os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        ):
            return None
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(
            lambda text: tok(text, add_special_tokens=False)["input_ids"],
            tok.bos_token_id,
            tok.eos_token_id,
            len(tok),
        )

    def encode_file(self, data: bytes) -> torch.Tensor:
        """``[n]`` long ids of one file with BOS/EOS (when the tokenizer has them)."""
        if self.encode_fn is None:
            body = (
                torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
                if data  # empty files (e.g. some __init__.py) contribute BOS EOS only
                else torch.zeros(0, dtype=torch.long)
            )
        else:
            body = torch.tensor(self.encode_fn(data.decode("utf-8", errors="replace")), dtype=torch.long)
        head = [self.bos] if self.bos is not None else []
        tail = [self.eos] if self.eos is not None else []
        return torch.cat([torch.tensor(head, dtype=torch.long), body, torch.tensor(tail, dtype=torch.long)])


def split_tokens(
    split: str, max_chars: int | None = None, root: str | None = None, tokenizer: Tokenizer | None = None
) -> torch.Tensor:
    """``[N]`` long: the split's files, each as ``BOS tokens EOS``, concatenated in path order.

    ``max_chars`` caps the bytes read (whole files, in order) for quick runs.
    """
    tokenizer = tokenizer or Tokenizer()
    root = root or stdlib_root()
    chunks: list[bytes] = []
    total = 0
    for rel in stdlib_files(root)[split]:
        with open(os.path.join(root, rel), "rb") as f:
            b = f.read()
        chunks.append(b)
        total += len(b)
        if max_chars is not None and total >= max_chars:
            break
    return torch.cat([tokenizer.encode_file(b) for b in chunks])


@dataclass
class LMBatches:
    """Fixed-length sequences of one split, batched.

    ``sequences``: ``[S, L]`` long; iteration yields ``{"input_ids", "attention_mask"}`` dicts of
    ``batch_size`` rows (shuffled each epoch when ``shuffle``, with a seeded generator).
    """

    sequences: torch.Tensor
    batch_size: int
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self._epoch = 0

    def __len__(self) -> int:
        return max(1, self.sequences.shape[0] // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The next pass yields epoch ``epoch``'s order (a function of seed and epoch alone)."""
        self._epoch = epoch

    def __iter__(self):
        n = self.sequences.shape[0]
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self._epoch)
            order = torch.randperm(n, generator=g)
            self._epoch += 1
        else:
            order = torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            ids = self.sequences[idx]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_sequences(tokens: torch.Tensor, seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """``[N] -> [S, seq_len]``: non-overlapping windows (the remainder is dropped)."""
    s = tokens.numel() // seq_len
    if s < 1:
        raise DataError(f"the corpus has {tokens.numel()} tokens, fewer than one sequence of {seq_len}")
    seqs = tokens[: s * seq_len].view(s, seq_len)
    return seqs if max_sequences is None else seqs[:max_sequences]


def stdlib_splits(
    seq_len: int,
    batch_size: int,
    max_chars: int | None = None,
    eval_sequences: int = 64,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
) -> dict[str, LMBatches]:
    """Train / val / test batches of the standard-library corpus.

    Val and test keep at most ``eval_sequences`` sequences each (evaluation cost stays bounded);
    train is shuffled per epoch.
    """
    train = make_sequences(split_tokens("train", max_chars, tokenizer=tokenizer), seq_len)
    val = make_sequences(split_tokens("val", tokenizer=tokenizer), seq_len, eval_sequences)
    test = make_sequences(split_tokens("test", tokenizer=tokenizer), seq_len, eval_sequences)
    eb = min(batch_size, 16)
    return {
        "train": LMBatches(train, batch_size, shuffle=True, seed=seed),
        "val": LMBatches(val, eb),
        "test": LMBatches(test, eb),
    }
