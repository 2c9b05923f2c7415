"""Slim Hugging Face models with per-layer widths: encoders (BERT, RoBERTa, ViT, DeiT: head counts
and FFN widths) and decoders (LLaMA, Mistral, Qwen2: query heads, KV heads and FFN widths).

This file is self-contained (it imports only torch and transformers). A slim model keeps its stock
class (``BertModel``, ``LlamaForCausalLM``, ...); its config becomes this file's subclass of the
stock config (``HawadaBertModelConfig``, ...), which carries the layout in ``hawada_layout`` and is
registered for ``AutoConfig``. So the model's own ``save_pretrained(folder)`` copies this file into
the folder, and ``config.json``'s ``auto_map`` names it for ``AutoConfig``, ``AutoModel`` and the
task's auto class: ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` rebuilds the model
with the slim classes below (the stock class whose ``__init__`` also applies the layout).
HawAda's own loader builds the same classes from the package's copy of this file (no remote code)
and gives the model back its stock class.

An encoder layout is ``{"style": "bert" | "vit", "head_dim": int, "layers": [{"attn": heads *
head_dim, "ffn": width}, ...]}``; a decoder layout is a list, one ``{"heads", "kv_heads",
"intermediate"}`` per layer. The stock class is built from the (unchanged) config first, then
every layer's linears are replaced by ones of the layout's widths (the caller loads the weights).
A model whose every layer has the widths its stock config describes keeps a stock config: no
layout, no ``auto_map``, and a plain ``from_pretrained`` loads it.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn

# Module paths inside one encoder layer, per layer style (transformers 5.x).
STYLES: dict[str, dict[str, str]] = {
    # BERT, RoBERTa, ...: BertSelfAttention reads num_attention_heads / attention_head_size.
    "bert": {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "attn": "attention.self",
        "up": "intermediate.dense",
        "down": "output.dense",
        "act": "intermediate.intermediate_act_fn",
    },
    # ViT, DeiT: the attention module owns q/k/v/o projections and reads num_attention_heads/head_dim.
    "vit": {
        "q": "attention.q_proj",
        "k": "attention.k_proj",
        "v": "attention.v_proj",
        "o": "attention.o_proj",
        "attn": "attention",
        "up": "mlp.fc1",
        "down": "mlp.fc2",
        "act": "mlp.activation_fn",
    },
}
LAYER_LISTS = ("encoder.layer", "layers")


class EmptyAttention(nn.Module):
    """Attention of a layer whose heads were all removed.

    Returns ``([B, L, 0] zeros, None)`` (BERT style: the following output dense adds its bias) or,
    with ``o_proj`` (ViT style, ``nn.Linear(0, hidden)``), ``o_proj`` of those zeros, i.e. its bias
    broadcast to ``[B, L, hidden]``.
    """

    def __init__(self, o_proj: nn.Linear | None = None) -> None:
        super().__init__()
        self.o_proj = o_proj

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        z = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.o_proj is not None:
            z = self.o_proj(z)
        return z, None


def get_path(root: nn.Module, path: str):
    """The attribute at dotted ``path`` under ``root`` (None when missing)."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(path, layers)`` of the encoder's layer list under the base model, or None."""
    base = getattr(model, "base_model", model)
    prefix = ""
    if base is not model:
        for name, mod in model.named_children():
            if mod is base:
                prefix = name + "."
    for p in LAYER_LISTS:
        lst = get_path(base, p)
        if isinstance(lst, nn.ModuleList) and len(lst) > 0:
            return prefix + p, lst
    return None


def layer_style(layer: nn.Module) -> str | None:
    """The style whose query projection the layer has (its other modules are checked elsewhere)."""
    for style, paths in STYLES.items():
        if isinstance(get_path(layer, paths["q"]), nn.Linear):
            return style
    return None


def set_layer_widths(layer: nn.Module, style: str, head_dim: int, attn: int, ffn: int, hidden: int) -> None:
    """In place: replace one layer's attention and FFN linears by fresh ones of the given widths."""
    p = STYLES[style]
    heads = attn // head_dim
    qkv_bias = get_path(layer, p["q"]).bias is not None
    if heads == 0:
        o_proj = nn.Linear(0, hidden)
        if style == "bert":
            set_path(layer, p["attn"], EmptyAttention())
            set_path(layer, p["o"], o_proj)
        else:
            set_path(layer, p["attn"], EmptyAttention(o_proj))
    else:
        attn_mod = get_path(layer, p["attn"])
        if isinstance(attn_mod, EmptyAttention):
            raise ValueError("cannot widen an attention whose heads were all removed")
        for key in ("q", "k", "v"):
            set_path(layer, p[key], nn.Linear(hidden, attn, bias=qkv_bias))
        set_path(layer, p["o"], nn.Linear(attn, hidden))
        set_attention_heads(attn_mod, style, heads, head_dim)
    set_path(layer, p["up"], nn.Linear(hidden, ffn))
    set_path(layer, p["down"], nn.Linear(ffn, hidden))


def set_attention_heads(attn_mod: nn.Module, style: str, heads: int, head_dim: int) -> None:
    """Update the head-count attributes the attention's forward reads."""
    attn_mod.num_attention_heads = heads
    if style == "bert":
        # BertSelfAttention.forward reshapes with attention_head_size; all_head_size is informative.
        attn_mod.attention_head_size = head_dim
        attn_mod.all_head_size = heads * head_dim
    else:
        attn_mod.head_dim = head_dim


def apply_layout(model: nn.Module, layout: dict) -> nn.Module:
    """In place: give a freshly built stock model the per-layer widths of ``layout``."""
    found = encoder_layers(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no encoder layer list ({', '.join(LAYER_LISTS)})")
    _, layers = found
    if len(layers) != len(layout["layers"]):
        raise ValueError(f"layout has {len(layout['layers'])} layers, the model {len(layers)}")
    hidden = model.config.hidden_size
    for layer, spec in zip(layers, layout["layers"]):
        set_layer_widths(
            layer, layout["style"], int(layout["head_dim"]), int(spec["attn"]), int(spec["ffn"]), hidden
        )
    return model


# ---------------------------------------------------------------------- decoders
class DecoderEmptyAttention(nn.Module):
    """Decoder attention with every head removed: returns ``o_proj``'s bias (or zeros).

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


def apply_decoder_layout(model: nn.Module, layout: list) -> nn.Module:
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
            layer.self_attn = DecoderEmptyAttention(hidden, i, bias).to(dev)
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


# ---------------------------------------------------------------------- slim classes
# The name under which transformers imports this file from a saved folder (its file name).
MODULE = "modeling_hawada"

# Stock classes a slim model may have, and the auto classes that load them. AutoModel gives the
# whole model the folder holds (task head included), like the task's own auto class.
ENCODER_CLASSES = (
    "BertModel",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertForMaskedLM",
    "RobertaModel",
    "RobertaForSequenceClassification",
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
)
DECODER_CLASSES = (
    "LlamaModel",
    "LlamaForCausalLM",
    "MistralModel",
    "MistralForCausalLM",
    "Qwen2Model",
    "Qwen2ForCausalLM",
)
STOCK_CLASSES = ENCODER_CLASSES + DECODER_CLASSES
TASK_AUTO = {
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForImageClassification": "AutoModelForImageClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForMaskedLM": "AutoModelForMaskedLM",
    "ForCausalLM": "AutoModelForCausalLM",
}


def _slim_config_class(name: str, stock: type) -> type:
    # Registered for AutoConfig: PreTrainedConfig.save_pretrained then copies this file next to
    # config.json (transformers' custom_object_save), which is what makes the folder loadable.
    return type(name, (stock,), {"__module__": __name__, "_auto_class": "AutoConfig"})


def _slim_class(stock: type, config_class: type) -> type:
    def __init__(self, config, *args, **kwargs):
        stock.__init__(self, config, *args, **kwargs)
        layout = getattr(config, "hawada_layout", None)
        if isinstance(layout, dict):
            apply_layout(self, layout)
        elif layout:
            apply_decoder_layout(self, layout)
            self.post_init()

    # config_class must be the config's own class: transformers' auto classes refuse to register
    # a remote model class whose config_class has another name than the config they were given.
    attrs = {"__init__": __init__, "__module__": __name__, "config_class": config_class}
    return type("Hawada" + stock.__name__, (stock,), attrs)


def _mirror_key_renames(slim_name: str, stock: type) -> None:
    """Give the slim class the checkpoint key renames transformers applies to its stock class.

    transformers (5.x) renames some classes' checkpoint keys on load and back on save (ViTModel:
    ``encoder.layer.N.attention.attention.query`` <-> ``layers.N.attention.q_proj``), looked up by
    class name, then model type, and never for classes defined outside transformers. Registered
    under the slim class's name, the same renames apply to it as to the stock class.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without key renames: the stock keys are the module names
        return
    mapping = get_checkpoint_conversion_mapping(stock.__name__) or get_checkpoint_conversion_mapping(
        stock.config_class.model_type
    )
    if mapping:
        register_checkpoint_conversion_mapping(slim_name, mapping, overwrite=True)


# One slim class per supported stock class (``HawadaBertModel``, ``HawadaLlamaForCausalLM``, ...),
# each with its own config class (``HawadaBertModelConfig``, ...). One config class per model class,
# not per stock config: an auto class registers the config class of the first remote model it
# loads (with this file's classes, shared by folders of the same name) and later goes by that
# registration, so a config class shared by ViTModel and ViTForImageClassification folders would
# make AutoModel give whichever of the two came first.
for _name in STOCK_CLASSES:
    _stock = getattr(transformers, _name, None)
    if _stock is None:
        continue
    _cfg = globals()[f"Hawada{_name}Config"] = _slim_config_class(f"Hawada{_name}Config", _stock.config_class)
    globals()["Hawada" + _name] = _slim_class(_stock, _cfg)
    _mirror_key_renames("Hawada" + _name, _stock)


def stock_name(name: str) -> str:
    """The stock class name of a slim class name (``HawadaBertModel`` -> ``BertModel``)."""
    return name[len("Hawada") :] if name.startswith("Hawada") and name[6:] in STOCK_CLASSES else name


def stock_config_class(cls: type) -> type:
    """The first transformers class in ``cls``'s MRO (the stock config a slim config extends)."""
    for c in cls.__mro__:
        if c.__module__.startswith("transformers."):
            return c
    return cls


def auto_map_for(model_class_name: str) -> dict[str, str]:
    """``auto_map`` of a slim folder holding a ``model_class_name`` (a stock class name)."""
    slim = f"{MODULE}.Hawada{model_class_name}"
    out = {"AutoConfig": f"{slim}Config", "AutoModel": slim}
    for suffix, auto in TASK_AUTO.items():
        if model_class_name.endswith(suffix):
            out[auto] = slim
    return out


def mark_slim(config: object, model_class_name: str, layout: object) -> None:
    """In place: make ``config`` the slim config class of ``model_class_name`` (a stock class
    name; the class extends ``config``'s stock class), carrying ``layout`` and ``auto_map``."""
    if "Hawada" + model_class_name not in globals():
        raise ValueError(f"{model_class_name} has no slim class (supported: {', '.join(STOCK_CLASSES)})")
    config.__class__ = globals()[f"Hawada{model_class_name}Config"]
    config.hawada_layout = layout
    config.auto_map = auto_map_for(model_class_name)


def mark_stock(config: object) -> None:
    """In place: give ``config`` back its stock class, without layout or ``auto_map``."""
    config.__class__ = stock_config_class(type(config))
    for key in ("hawada_layout", "auto_map"):
        if key in config.__dict__:
            delattr(config, key)
