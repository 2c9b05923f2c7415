"""sentence-transformers folders: the pooling a text encoder's embedding is made with, read from a
folder's ``modules.json`` and written next to a saved encoder.

A sentence-transformers folder is a Hugging Face model folder plus ``modules.json``: a Transformer
module (the encoder), a Pooling module (``1_Pooling/config.json``: how token states become one
vector) and, optionally, a Normalize module (L2 normalisation). HawAda records the pooling on the
model's config (``config.hawada_pooling``, see :func:`set_pooling`), so it travels with every copy:
the teacher, the gated student, the exported slim model and the saved folder pool alike.

Writing needs only JSON files: the ``sentence-transformers`` package is needed to load the folder,
never to write it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hawada.errors import InputError

CONFIG_KEY = "hawada_pooling"  # on the model's config (saved into config.json)
# Pooling modes in sentence-transformers' Pooling module (all supported here).
MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# Legacy boolean keys of 1_Pooling/config.json, in sentence-transformers' concatenation order.
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# The module types written (the names sentence-transformers 6 writes itself).
TRANSFORMER_TYPE = "sentence_transformers.base.modules.transformer.Transformer"
POOLING_TYPE = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
NORMALIZE_TYPE = "sentence_transformers.base.modules.normalize.Normalize"


@dataclass(frozen=True)
class Pooling:
    """How ``[B, L, D]`` token states become a ``[B, len(modes) * D]`` embedding: each mode pooled,
    concatenated in order, then L2-normalised when ``normalize``."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: dict) -> Pooling:
        return cls(
            _check_modes(d.get("modes", ["mean"]), "config.hawada_pooling"), bool(d.get("normalize", True))
        )


# Today's behaviour for a plain Hugging Face folder: normalised mean over the real tokens.
DEFAULT_POOLING = Pooling()


@dataclass(frozen=True)
class STFolder:
    """What HawAda takes from a sentence-transformers folder."""

    transformer_path: str  # the Hugging Face folder, relative to the ST folder ("" = the same)
    pooling: Pooling
    max_seq_length: int | None  # sentence_bert_config.json's truncation length, if declared


def _check_modes(modes: Any, where: str) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = [modes]
    if not isinstance(modes, list | tuple) or not modes:
        raise InputError(
            f"{where}: pooling_mode must be a mode name or a non-empty list of them, got {modes!r}"
        )
    for m in modes:
        if m not in MODES:
            raise InputError(f"{where}: unsupported pooling mode {m!r} (supported: {', '.join(MODES)})")
    return tuple(modes)


def _read_json(path: str, where: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None


def is_st_folder(path: str) -> bool:
    """True when ``path`` is a sentence-transformers folder (it holds ``modules.json``)."""
    return os.path.isfile(os.path.join(path, "modules.json"))


def _kind(entry: Any, where: str) -> str:
    """``Transformer`` / ``Pooling`` / ``Normalize`` for a modules.json entry; InputError otherwise."""
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str) or "path" not in entry:
        raise InputError(f"{where}: every entry needs a 'type' and a 'path', got {entry!r}")
    t = entry["type"]
    name = t.rpartition(".")[2]
    # Accept the old (sentence_transformers.models.X) and new module paths of the three classes.
    if t.startswith("sentence_transformers.") and name in ("Transformer", "Pooling", "Normalize"):
        return name
    raise InputError(
        f"{where}: module {t} is not supported (HawAda reads Transformer, Pooling and Normalize modules)"
    )


def read_st_folder(path: str) -> STFolder:
    """The Transformer path, pooling and truncation length of the sentence-transformers folder ``path``.

    The modules must be one Transformer, then one Pooling, then optionally one Normalize (what a
    sentence embedding model holds); anything else is refused with one line naming it.
    """
    where = f"model.path: {os.path.join(path, 'modules.json')}"
    entries = _read_json(os.path.join(path, "modules.json"), where)
    if not isinstance(entries, list):
        raise InputError(f"{where}: expected a list of modules")
    kinds = [_kind(e, where) for e in entries]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise InputError(
            f"{where}: modules {' -> '.join(kinds) or 'none'} are not supported (HawAda reads "
            "Transformer -> Pooling, optionally -> Normalize)"
        )
    transformer, pooling_entry = entries[0], entries[1]
    sub = os.path.join(path, pooling_entry["path"], "config.json")
    if not os.path.isfile(sub):
        raise InputError(f"{where}: the Pooling module's config {sub} is missing")
    pcfg = _read_json(sub, where)
    if not isinstance(pcfg, dict):
        raise InputError(f"{sub}: expected a JSON object")
    if "pooling_mode" in pcfg:
        modes = pcfg["pooling_mode"]
    else:
        modes = [mode for key, mode in _LEGACY_KEYS.items() if pcfg.get(key, False)] or ["mean"]
    modes = _check_modes(modes, sub)
    normalize = len(entries) == 3
    if normalize:
        ncfg_path = os.path.join(path, entries[2]["path"], "config.json")
        ncfg = _read_json(ncfg_path, where) if os.path.isfile(ncfg_path) else {}
        target = ncfg.get("module_input_name", "sentence_embedding") if isinstance(ncfg, dict) else None
        if target != "sentence_embedding":
            raise InputError(
                f"{ncfg_path}: Normalize of {target!r} is not supported (only the sentence embedding)"
            )
    tpath = transformer["path"] or ""
    max_len = None
    for name in (
        "sentence_bert_config.json",
        "sentence_roberta_config.json",
        "sentence_distilbert_config.json",
    ):
        cfg_path = os.path.join(path, tpath, name)
        if os.path.isfile(cfg_path):
            cfg = _read_json(cfg_path, where)
            if isinstance(cfg, dict) and isinstance(cfg.get("max_seq_length"), int):
                max_len = int(cfg["max_seq_length"])
            break
    return STFolder(tpath, Pooling(modes, normalize), max_len)


def transformer_folder(path: str) -> str:
    """The Hugging Face model folder of ``path``: itself, or a sentence-transformers folder's
    Transformer sub-folder."""
    if not is_st_folder(path):
        return path
    return os.path.join(path, read_st_folder(path).transformer_path)


def folder_pooling(path: str) -> Pooling | None:
    """The pooling a sentence-transformers folder declares; None for any other folder."""
    return read_st_folder(path).pooling if is_st_folder(path) else None


def set_pooling(model: nn.Module, pooling: Pooling) -> None:
    """Record ``pooling`` on ``model.config`` (copies, exports and ``save_pretrained`` keep it)."""
    setattr(model.config, CONFIG_KEY, pooling.to_dict())


def pooling_of(model: nn.Module) -> Pooling:
    """The pooling recorded on ``model``'s config; :data:`DEFAULT_POOLING` when none is."""
    d = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return Pooling.from_dict(d) if isinstance(d, dict) else DEFAULT_POOLING


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """``[B, L, D]`` token states and ``[B, L]`` mask (1 = real token) -> ``[B, k * D]`` embedding,
    ``k = len(pooling.modes)``.

    Each mode computes what sentence-transformers' Pooling module computes on a padded batch (so a
    folder's ``SentenceTransformer.encode`` and HawAda agree to float rounding); half-precision
    sums accumulate in fp32 as there.
    """
    b, length, _ = hidden.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, length, dtype=torch.long, device=hidden.device)
    acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    out = []
    for mode in pooling.modes:
        if mode == "cls":  # the first real token (index 0 unless left-padded)
            first = attention_mask.to(torch.int).argmax(dim=1)
            out.append(hidden[torch.arange(b, device=hidden.device), first])
        elif mode == "max":
            out.append(hidden.masked_fill(attention_mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            total = (hidden * m).sum(dim=1, dtype=acc)
            count = m.sum(dim=1, dtype=acc).clamp(min=1e-9)
            out.append((total / (count if mode == "mean" else count.sqrt())).to(hidden.dtype))
        elif mode == "weightedmean":  # position weights 1, 2, ... from the first real token
            m = attention_mask.unsqueeze(-1).to(acc)
            w = torch.arange(1, length + 1, device=hidden.device, dtype=acc).view(1, -1, 1)
            w = w - attention_mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            wm = m * w
            out.append(((hidden * wm).sum(dim=1) / wm.sum(dim=1).clamp(min=1e-9)).to(hidden.dtype))
        elif mode == "lasttoken":  # the last real token
            values, idx = attention_mask.flip(1).max(1)
            idx = torch.where(values == 0, length - 1, idx)
            masked = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
            out.append(masked[torch.arange(b, device=hidden.device), length - idx - 1])
        else:  # Pooling checks its modes; a new mode must be added here too
            raise ValueError(f"pooling mode {mode!r} has no implementation")
    emb = torch.cat(out, dim=-1)
    return F.normalize(emb, p=2, dim=-1) if pooling.normalize else emb


def write_st_folder(path: str, pooling: Pooling, hidden_size: int, max_seq_length: int | None) -> None:
    """Make the saved Hugging Face folder ``path`` (weights, config, tokenizer already there) a
    sentence-transformers folder too: ``modules.json``, ``1_Pooling/config.json``,
    ``2_Normalize/config.json`` when ``pooling.normalize``, ``sentence_bert_config.json`` (with
    ``max_seq_length`` when given) and ``config_sentence_transformers.json``.

    Only JSON is written: the ``sentence-transformers`` package is not needed.
    """
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": TRANSFORMER_TYPE},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": POOLING_TYPE},
    ]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": NORMALIZE_TYPE})

    def dump(rel: str, obj: Any) -> None:
        full = os.path.join(path, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            json.dump(obj, f, indent=2)

    dump("modules.json", modules)
    mode: Any = pooling.modes[0] if len(pooling.modes) == 1 else list(pooling.modes)
    dump(
        "1_Pooling/config.json",
        {"embedding_dimension": int(hidden_size), "pooling_mode": mode, "include_prompt": True},
    )
    if pooling.normalize:
        dump("2_Normalize/config.json", {"module_input_name": "sentence_embedding"})
    st_cfg: dict[str, Any] = {"transformer_task": "feature-extraction"}
    if max_seq_length is not None:
        st_cfg["max_seq_length"] = int(max_seq_length)
    dump("sentence_bert_config.json", st_cfg)
    # Cosine: what HawAda's agreement metrics compare embeddings with.
    dump(
        "config_sentence_transformers.json",
        {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"},
    )
