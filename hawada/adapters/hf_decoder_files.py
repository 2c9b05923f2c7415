"""The hf_decoder family's structure and files: per-layer widths, the layout recorded in the
config, and saving / loading slim decoders with stock transformers classes (or, for a non-uniform
layout, the ``trust_remote_code`` modeling file written beside the weights)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from hawada.errors import InputError, PathNotFoundError

KNOWN_CLASSES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaModel",
    "MistralModel",
    "Qwen2Model",
)
LAYOUT_FILE = "layout.json"


class CheckpointError(PathNotFoundError):
    """A model folder that is not a loadable Hugging Face checkpoint."""


# ---------------------------------------------------------------------- self-contained pieces
# EmptyAttention and apply_layout are also copied verbatim into the saved folder's
# modeling file (for ``trust_remote_code``), so they import nothing from hawada.
class EmptyAttention(nn.Module):
    """Attention with every head removed: returns ``o_proj``'s bias (or zeros).

    ``hidden_states`` ``[B, L, D]`` -> ``([B, L, D], None)``. It still appends a one-element
    ``[B, 1, L, 1]`` placeholder to the KV cache, because the cache reports its length from
    the stored keys and an empty layer would otherwise reset positions during generation.
    """

    is_empty_attention = True

    def __init__(self, hidden_size: int, layer_idx: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.num_key_value_groups = 1
        if bias is not None:
            self.o_bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("o_bias", None)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        b, n = hidden_states.shape[:2]
        past = cache if cache is not None else kwargs.get("past_key_values")
        if past is not None:
            ph = hidden_states.new_zeros(b, 1, n, 1)
            past.update(ph, ph, self.layer_idx)
        out = hidden_states.new_zeros(b, n, self.hidden_size)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


def apply_layout(model, layout):
    """In place: give each decoder layer of a freshly built model the widths of ``layout``.

    ``layout``: list (one per layer) of ``{"heads", "kv_heads", "intermediate"}``. The new
    modules are uninitialised shells; the caller loads the weights.
    """
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hidden = cfg.hidden_size
    dev = next(model.parameters()).device
    for i, (layer, lay) in enumerate(zip(base.layers, layout)):
        attn, mlp = layer.self_attn, layer.mlp
        qh, kvh, inter = int(lay["heads"]), int(lay["kv_heads"]), int(lay["intermediate"])
        if qh == 0 or kvh == 0:
            o = getattr(attn, "o_proj", None)
            has_bias = o is not None and o.bias is not None
            bias = torch.zeros(hidden, device=dev) if has_bias else None
            layer.self_attn = EmptyAttention(hidden, i, bias).to(dev)
        elif not getattr(attn, "is_empty_attention", False):

            def lin(old, fin, fout):
                return nn.Linear(fin, fout, bias=old.bias is not None, device=dev, dtype=old.weight.dtype)

            attn.q_proj = lin(attn.q_proj, hidden, qh * head_dim)
            attn.k_proj = lin(attn.k_proj, hidden, kvh * head_dim)
            attn.v_proj = lin(attn.v_proj, hidden, kvh * head_dim)
            attn.o_proj = lin(attn.o_proj, qh * head_dim, hidden)
            attn.num_key_value_groups = qh // kvh
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        mlp.gate_proj = nn.Linear(hidden, inter, bias=g.bias is not None, device=dev, dtype=g.weight.dtype)
        mlp.up_proj = nn.Linear(hidden, inter, bias=u.bias is not None, device=dev, dtype=u.weight.dtype)
        mlp.down_proj = nn.Linear(inter, hidden, bias=d.bias is not None, device=dev, dtype=d.weight.dtype)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
    return model


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
        "arch": type(model).__name__,
        "model_type": cfg.model_type,
        "head_dim": head_dim_of(model),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": vocab_size_of(model),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "layers": layer_widths(model),
    }


# ---------------------------------------------------------------------- config + files
def _is_uniform(layout: list[dict]) -> bool:
    first = layout[0]
    return all(lay == first for lay in layout) and first["heads"] > 0 and first["kv_heads"] > 0


def record_layout(model: nn.Module, layout: list[dict]) -> None:
    """Write the per-layer widths into ``model.config`` (stock fields when uniform)."""
    cfg = model.config
    cfg.head_dim = head_dim_of(model)  # RoPE and attention read it; it must not follow num_heads
    if _is_uniform(layout):
        cfg.num_attention_heads = layout[0]["heads"]
        cfg.num_key_value_heads = layout[0]["kv_heads"]
        cfg.intermediate_size = layout[0]["intermediate"]
        if hasattr(cfg, "hawada_layout"):
            del cfg.hawada_layout
    else:
        cfg.hawada_layout = [dict(x) for x in layout]


MODELING_FILE = "modeling_hawada.py"


def _modeling_source(arch: str) -> str:
    """The ``trust_remote_code`` modeling file: the stock class plus :func:`apply_layout`."""
    return (
        '"""Per-layer widths for a pruned decoder (written by HawAda; needs only transformers)."""\n\n'
        "import torch\nfrom torch import nn\n"
        f"from transformers import {arch} as _Base\n\n\n"
        + inspect.getsource(EmptyAttention)
        + "\n\n"
        + inspect.getsource(apply_layout)
        + "\n\n"
        + f"class Hawada{arch}(_Base):\n"
        + "    def __init__(self, config):\n"
        + "        super().__init__(config)\n"
        + "        apply_layout(self, config.hawada_layout)\n"
        + "        self.post_init()\n"
    )


def save_decoder(model: nn.Module, path: str) -> None:
    """``save_pretrained`` (safetensors) + ``layout.json``; non-uniform layouts also get a
    ``modeling_hawada.py`` and ``auto_map`` so ``AutoModelForCausalLM`` loads them with
    ``trust_remote_code=True``."""
    os.makedirs(path, exist_ok=True)
    layout = layer_widths(model)
    record_layout(model, layout)
    cfg = model.config
    arch = type(model).__name__
    uniform = _is_uniform(layout)
    if not uniform:
        cfg.auto_map = {"AutoModelForCausalLM": f"modeling_hawada.Hawada{arch}"}
        with open(os.path.join(path, MODELING_FILE), "w") as f:
            f.write(_modeling_source(arch))
    elif hasattr(cfg, "auto_map"):
        del cfg.auto_map
    model.save_pretrained(path, safe_serialization=True)
    lay = decoder_layout(model)
    lay["uniform"] = uniform
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
    """Load a folder written by :func:`save_decoder` with stock transformers classes."""
    import transformers

    cfg = _read_config(path)
    with open(os.path.join(path, LAYOUT_FILE)) as f:
        lay = json.load(f)
    cls = getattr(transformers, lay["arch"], None)
    if cls is None or lay["arch"] not in KNOWN_CLASSES:
        raise InputError(f"{path}: architecture {lay['arch']!r} is not one the hf_decoder family loads")
    if hasattr(cfg, "auto_map"):
        del cfg.auto_map
    state = _state_dict_from(path)
    # built in the dtype the weights were saved in, as from_pretrained does: a bf16 slim model
    # loads as bf16, and buffers the modeling code keeps in fp32 (RoPE frequencies) stay fp32
    with _default_dtype(_saved_dtype(state)):
        model = cls(cfg)
        if not _is_uniform(lay["layers"]):
            apply_layout(model, lay["layers"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if lay.get("tie_word_embeddings") else set()
    if set(missing) - tied or unexpected:
        raise InputError(
            f"{path}: weights do not fit the layout (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    if tied:
        model.tie_weights()
    record_layout(model, lay["layers"])
    return model.eval()


def load_causal_lm(path: str, attn_implementation: str | None = None, dtype: Any = None) -> nn.Module:
    """A teacher from a Hugging Face folder (or a HawAda-saved slim folder)."""
    if os.path.isfile(os.path.join(path, LAYOUT_FILE)):
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
