"""The hf_decoder family's structure and files: per-layer widths, the layout recorded in the
config, and saving / loading slim decoders with stock transformers classes.

A non-uniform layout makes the config hf_remote's slim config class
(``HawadaLlamaForCausalLMConfig``, ...), so the model's own ``save_pretrained`` also writes
``modeling_hawada.py`` and ``auto_map`` for ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`` (docs/DESIGN.md, "Saved models"); a uniform one is a stock config."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hawada.adapters.hf_layers import depth_summary
from hawada.errors import InputError, PathNotFoundError
from hawada.hf_remote import modeling_hawada as remote
from hawada.hf_remote.folder import LAYOUT_FILE, declares_layout

# The classes a slim folder is saved and loaded as (each has a slim class in hf_remote).
KNOWN_CLASSES = remote.DECODER_CLASSES

# The modules a pruned decoder is built from live in the file shipped with saved folders (it
# imports nothing from hawada); these are their names in this family.
EmptyAttention = remote.DecoderEmptyAttention
apply_layout = remote.apply_decoder_layout


class CheckpointError(PathNotFoundError):
    """A model folder that is not a loadable Hugging Face checkpoint."""


# ---------------------------------------------------------------------- structure helpers
def decoder_base(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (``model.model`` of a ``*ForCausalLM``, else the model)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    return model


def has_layer_layout(model: nn.Module) -> bool:
    base = decoder_base(model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_key_value_heads") or not hasattr(cfg, "num_attention_heads"):
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        if not getattr(attn, "is_empty_attention", False) and not all(
            hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            return False
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return False
    return True


def head_dim_of(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: query heads, KV heads and FFN width of a plain (or gated) model."""
    hd = head_dim_of(model)
    out = []
    for layer in decoder_base(model).layers:
        attn = layer.self_attn
        if getattr(attn, "is_empty_attention", False):
            q = kv = 0
        else:
            q, kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        out.append({"heads": q, "kv_heads": kv, "intermediate": layer.mlp.up_proj.out_features})
    return out


def is_decoder(model: nn.Module) -> bool:
    """A LLaMA-shaped decoder: a known class, or any transformers model with its layer layout."""
    if type(model).__name__ in KNOWN_CLASSES:
        return has_layer_layout(model)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of this family
        return False
    return isinstance(model, PreTrainedModel) and has_layer_layout(model)


def vocab_size_of(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None else int(model.config.vocab_size)


def decoder_layout(model: nn.Module) -> dict:
    """The per-layer widths and what a loader needs to rebuild the model (``layout.json``)."""
    cfg = model.config
    return {
        "family": "hf_decoder",
        "arch": remote.stock_name(type(model).__name__),
        "model_type": cfg.model_type,
        "head_dim": head_dim_of(model),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": vocab_size_of(model),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "layers": layer_widths(model),
        **depth_summary(cfg, len(decoder_base(model).layers)),
    }


# ---------------------------------------------------------------------- config + files
def _is_uniform(layout: list[dict]) -> bool:
    first = layout[0]
    return all(lay == first for lay in layout) and first["heads"] > 0 and first["kv_heads"] > 0


def record_layout(model: nn.Module, layout: list[dict]) -> None:
    """Write the per-layer widths into ``model.config``: the stock fields when uniform (the config
    stays a stock one: no layout, no ``auto_map``), else ``hawada_layout`` in hf_remote's slim
    config class, whose ``save_pretrained`` writes the modeling file and ``auto_map``."""
    cfg = model.config
    cfg.head_dim = head_dim_of(model)  # RoPE and attention read it; it must not follow num_heads
    arch = remote.stock_name(type(model).__name__)
    if _is_uniform(layout):
        cfg.num_attention_heads = layout[0]["heads"]
        cfg.num_key_value_heads = layout[0]["kv_heads"]
        cfg.intermediate_size = layout[0]["intermediate"]
        remote.mark_stock(cfg)
    elif arch in KNOWN_CLASSES:
        remote.mark_slim(cfg, arch, [dict(x) for x in layout])
    else:  # no slim class to load it with (the loader names the class); keep the layout on record
        cfg.hawada_layout = [dict(x) for x in layout]


def save_decoder(model: nn.Module, path: str) -> None:
    """The model's own ``save_pretrained`` (config with the layout, and for a non-uniform layout
    ``modeling_hawada.py`` + ``auto_map``; safetensors weights), after :func:`record_layout`, plus
    ``layout.json``: a description of the widths that the loaders do not need."""
    layout = layer_widths(model)
    record_layout(model, layout)
    model.save_pretrained(path, safe_serialization=True)
    lay = decoder_layout(model)
    lay["uniform"] = _is_uniform(layout)
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump(lay, f, indent=1)


def _read_config(path: str):
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def _state_dict_from(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for fn in files:
            state.update(load_file(os.path.join(path, fn)))
        return state
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"{path} has no model.safetensors")
    return load_file(single)


def _saved_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most saved weights (by element count) have; fp32 when none is floating."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def load_decoder(path: str) -> nn.Module:
    """Load a folder written by ``save_pretrained`` of a (slim or stock) decoder, or by
    :func:`save_decoder`, with stock transformers classes (no remote code): the widths come from
    ``config.hawada_layout`` (absent: the stock config's)."""
    import transformers

    cfg = _read_config(path)
    names = list(getattr(cfg, "architectures", None) or [])
    if not names and os.path.isfile(os.path.join(path, LAYOUT_FILE)):
        with open(os.path.join(path, LAYOUT_FILE)) as f:
            names = [json.load(f).get("arch", "")]
    arch = remote.stock_name(str(names[0])) if names else ""
    cls = getattr(transformers, arch, None)
    if cls is None or arch not in KNOWN_CLASSES:
        raise InputError(f"{path}: architecture {arch!r} is not one the hf_decoder family loads")
    layout = getattr(cfg, "hawada_layout", None)
    remote.mark_stock(cfg)  # build the stock class; record_layout below marks the config again
    state = _state_dict_from(path)
    # built in the dtype the weights were saved in, as from_pretrained does: a bf16 slim model
    # loads as bf16, and buffers the modeling code keeps in fp32 (RoPE frequencies) stay fp32
    with _default_dtype(_saved_dtype(state)):
        model = cls(cfg)
        if layout:
            apply_layout(model, layout)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    tied = {k for k in missing if k.endswith("lm_head.weight")} if tie else set()
    if set(missing) - tied or unexpected:
        raise InputError(
            f"{path}: weights do not fit the layout (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    if tied:
        model.tie_weights()
    record_layout(model, layer_widths(model))
    return model.eval()


def load_causal_lm(path: str, attn_implementation: str | None = None, dtype: Any = None) -> nn.Module:
    """A teacher from a Hugging Face folder (or a HawAda-saved slim folder)."""
    if declares_layout(path):
        return load_decoder(path)
    cfg = _read_config(path)
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, **kw)
    if not is_decoder(model):
        raise InputError(f"{path}: {type(model).__name__} does not have the LLaMA layer layout")
    return model.eval()
