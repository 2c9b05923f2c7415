"""Slim Hugging Face encoders with per-layer head counts and FFN widths.

This file is self-contained (it imports only torch and transformers): HawAda copies it next to
every saved slim encoder so that ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
can rebuild the model, and HawAda's own loader uses the same functions with stock classes.

A layout is ``{"style": "bert" | "vit", "head_dim": int, "layers": [{"attn": heads * head_dim,
"ffn": width}, ...]}``. The stock class is built from the (unchanged) config first, then every
layer's attention and FFN linears are replaced by ones of the layout's widths.
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


def _slim_class(stock: type) -> type:
    def __init__(self, config, *args, **kwargs):
        stock.__init__(self, config, *args, **kwargs)
        layout = getattr(config, "hawada_layout", None)
        if layout:
            apply_layout(self, layout)

    return type("Hawada" + stock.__name__, (stock,), {"__init__": __init__, "__module__": __name__})


# One slim class per supported stock class: ``HawadaBertModel``, ``HawadaViTForImageClassification``, ...
STOCK_CLASSES = (
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
for _name in STOCK_CLASSES:
    _stock = getattr(transformers, _name, None)
    if _stock is not None:
        globals()["Hawada" + _name] = _slim_class(_stock)
