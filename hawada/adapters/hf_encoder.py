"""Hugging Face encoders: BERT-style (BertModel, RobertaModel and their task heads) and ViT-style
(ViTModel, ViTForImageClassification, DeiT) layers.

Segments (per encoder layer ``i``):
* ``layer{i}.heads``, kind ``head``: the attention heads (one gate per head by default). A head's
  query/key/value rows and its output-projection columns share the gate (invariant 4); the mask
  is applied to the output projection's input (a :class:`GatedLinear` whose unit covers
  ``head_dim`` input features), so the gated forward is the stock forward plus a mask.
* ``layer{i}.ffn``, kind ``ffn``: intermediate neurons in groups (default 32; the last group may
  be partial). Masked on the pre-activation output of the up projection; every supported
  activation maps 0 to 0 (checked at attach), so a closed neuron contributes exactly nothing.
* ``layer{i}.layer``, kind ``layer``: the whole layer, one unit (:mod:`hawada.adapters.hf_layers`):
  its output becomes ``x + z (h - x)``, so a closed layer is the identity and export removes it
  from the layer list (``num_hidden_layers`` follows; ``config.hawada_depth`` records the kept
  original layers).

Export slices the linears and updates the attention's head count; a layer whose heads are all
closed gets an :class:`EmptyAttention` (only the output bias remains, as in the gated model), a
layer whose FFN is all closed gets zero-width linears. A layout the stock config cannot describe
is stored in ``config.hawada_layout`` and the config becomes hf_remote's slim config class, so the
model's own ``save_pretrained`` writes a folder that ``AutoModel.from_pretrained(...,
trust_remote_code=True)`` and :func:`hawada.load_slim` both load (docs/DESIGN.md, "Saved models").

A classifier (``*ForImageClassification``, ``*ForSequenceClassification``) stays one from loading
to the saved slim folder: its head is never gated or sliced, and distillation compares its
``[B, C]`` logits (``kd_kind`` ``logits``); a bare encoder is distilled on its pooled embeddings
(``kd_kind`` ``embedding``). The pooling is a property of the model, recorded on its config
(:mod:`hawada.adapters.st_folder`): a sentence-transformers folder's Pooling/Normalize modules when
loaded from one, the normalised mean over real tokens otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from hawada.adapters import hf_layers, st_folder
from hawada.adapters.base import Adapter, UnknownModelError, register_adapter
from hawada.core.export import ExportPolicy, clone_without_gates, slice_linear, store_of
from hawada.core.gates import GateConfig, GateStore
from hawada.core.hooks import gate_linear, gates_of, install_store
from hawada.core.proxy_cost import CostTerm
from hawada.errors import InputError, PathNotFoundError
from hawada.hf_remote import modeling_hawada as remote
from hawada.hf_remote.folder import LAYOUT_FILE, declares_layout, read_config_json
from hawada.hf_remote.modeling_hawada import (
    STYLES,
    EmptyAttention,
    encoder_layers,
    get_path,
    set_attention_heads,
)

# Task heads whose output is one row of class logits per example: a folder declaring one of these
# is loaded as that class, so the head survives and distillation compares logits [B, C].
CLASSIFIER_SUFFIXES = ("ForImageClassification", "ForSequenceClassification")


class LayoutError(UnknownModelError):
    """A model whose encoder layers do not have the layout this adapter gates."""


def load_pretrained(path: str) -> nn.Module:
    """A transformers encoder from the local folder ``path``, built by transformers' own classes
    (local files only, no remote code).

    A folder whose ``config.architectures`` names a classifier (``*ForImageClassification``,
    ``*ForSequenceClassification``) gives that class, head included; any other folder (a bare
    encoder, a masked-LM checkpoint) gives the bare encoder ``AutoModel`` builds, whose output
    distillation compares as embeddings.
    """
    import transformers
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    declared = [a for a in (getattr(config, "architectures", None) or []) if a.endswith(CLASSIFIER_SUFFIXES)]
    if not declared:
        return AutoModel.from_pretrained(path, config=config, local_files_only=True, trust_remote_code=False)
    name = declared[0]
    cls = getattr(transformers, name, None)
    # Only classes a slim folder can be reloaded as (hf_remote's slim subclasses): any other
    # would train for the whole run and fail when its slim model is saved.
    supported = [c for c in remote.ENCODER_CLASSES if c.endswith(CLASSIFIER_SUFFIXES)]
    if cls is None or name not in supported:
        raise LayoutError(
            f"model.path: {path} declares a {name}; the hf_encoder family loads the classifiers "
            f"{', '.join(supported)}"
        )
    if not isinstance(config, cls.config_class):
        raise LayoutError(
            f"model.path: {path} declares a {name}, but its config is a {type(config).__name__} "
            f"(model_type {config.model_type!r})"
        )
    return cls.from_pretrained(path, config=config, local_files_only=True)


def _style_and_layers(model: nn.Module) -> tuple[str, str, nn.ModuleList]:
    """``(style, layer list path, layers)``; raises :class:`LayoutError` naming the first mismatch."""
    found = encoder_layers(model)
    if found is None:
        raise LayoutError(
            f"{type(model).__name__}: no encoder layer list found (looked for "
            f"{' / '.join(remote.LAYER_LISTS)} under the base model)"
        )
    path, layers = found
    style = remote.layer_style(layers[0])
    if style is None:
        q = " or ".join(f"{path}.0.{p['q']}" for p in STYLES.values())
        raise LayoutError(
            f"{type(model).__name__}: module {q} not found (not a BERT/ViT-style encoder layer)"
        )
    for i, layer in enumerate(layers):
        for key, sub in STYLES[style].items():
            mod = get_path(layer, sub)
            ok = callable(mod) if key == "act" else isinstance(mod, nn.Linear)
            if key == "attn":
                ok = isinstance(mod, nn.Module) and not isinstance(mod, EmptyAttention)
            if not ok:
                what = type(mod).__name__ if mod is not None else "missing"
                raise LayoutError(
                    f"{type(model).__name__}: module {path}.{i}.{sub} does not match the {style} encoder "
                    f"layout ({what})"
                )
    return style, path, layers


def _head_dim(model: nn.Module, style: str, layers: nn.ModuleList) -> int:
    attn = get_path(layers[0], STYLES[style]["attn"])
    hd = getattr(attn, "attention_head_size", None) or getattr(attn, "head_dim", None)
    return int(hd)


def _is_bare(model: nn.Module) -> bool:
    """True for a bare encoder (no task head): its output is the hidden states."""
    return getattr(model, "base_model", model) is model


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, D]`` hidden states, ``[B, L]`` mask -> ``[B, D]`` L2-normalised mean over real tokens
    (the default pooling of a bare encoder)."""
    return st_folder.pool(hidden, attention_mask, st_folder.DEFAULT_POOLING)


def embedding(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, L, D]`` last hidden states -> ``[B, k * D]`` embeddings, pooled as ``model``'s config
    records (:func:`hawada.adapters.st_folder.pooling_of`)."""
    return st_folder.pool(hidden, attention_mask, st_folder.pooling_of(model))


_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@register_adapter
class HFEncoderAdapter(Adapter):
    family = "hf_encoder"
    kd_kind = "embedding"
    default_group_size = {"head": 1, "ffn": 32, "layer": 1}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        # Claim any transformers model whose first encoder layer has a BERT/ViT-style query
        # projection; attach() then checks every module and names the first that differs.
        try:
            from transformers import PreTrainedModel
        except ImportError:
            return False
        if not isinstance(model, PreTrainedModel):
            return False
        found = encoder_layers(model)
        if found is None:
            return False
        if remote.layer_style(found[1][0]) is not None:
            return True
        try:  # a slim model whose first layer lost every head
            _loose_layers(model)
            return any(isinstance(m, EmptyAttention) for m in model.modules())
        except LayoutError:
            return False

    # ------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, config: GateConfig) -> nn.Module:
        style, _, layers = _style_and_layers(model)
        hd = _head_dim(model, style, layers)
        p = STYLES[style]
        for i, layer in enumerate(layers):
            act = get_path(layer, p["act"])
            zero = act(torch.zeros(3, dtype=torch.float32))
            if not torch.equal(zero, torch.zeros_like(zero)):
                raise LayoutError(
                    f"layer {i}: activation {type(act).__name__} does not map 0 to 0, so FFN neurons "
                    "cannot be removed by masking"
                )
        self.kd_kind = "embedding" if _is_bare(model) else "logits"
        store = GateStore(config)
        gate_heads, gate_ffn, gate_layer = config.wants("head"), config.wants("ffn"), config.wants("layer")
        for i, layer in enumerate(layers):
            if gate_heads:
                heads = get_path(layer, p["q"]).out_features // hd
                store.register(f"layer{i}.heads", "head", heads, config.group_for("head", 1), i)
            if gate_ffn:
                width = get_path(layer, p["up"]).out_features
                store.register(
                    f"layer{i}.ffn", "ffn", width, config.group_for("ffn", self.default_group_size["ffn"]), i
                )
        if gate_layer:  # after every width gate: the width segments keep their places in the store
            hf_layers.register_layer_gates(store, len(layers), config.group_for("layer", 1))
        if len(store) == 0:
            raise InputError(
                "GateConfig.kinds selects no kind the hf_encoder adapter gates ('head', 'ffn', 'layer')"
            )
        install_store(model, store, self)
        hf_layers.hook_layer_gates(store, layers)
        for i, layer in enumerate(layers):
            if gate_heads:
                gate_linear(get_path(layer, p["o"]), store, f"layer{i}.heads", "in", elements_per_unit=hd)
            if gate_ffn:
                gate_linear(get_path(layer, p["up"]), store, f"layer{i}.ffn", "out")
        return model

    # ------------------------------------------------------------------ data
    def model_inputs(self, batch: Any) -> Any:
        """Kwargs for the model: a text batch dict keeps its tensors, an image batch gives pixel_values."""
        if isinstance(batch, dict):
            return {k: v for k, v in batch.items() if k in _TEXT_KEYS or k == "pixel_values"}
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return {"pixel_values": x}

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``[B, D]`` pooled embeddings (bare encoders; the model's recorded pooling, see
        :func:`embedding`) or ``[B, C]`` logits."""
        inputs = self.model_inputs(batch)
        out = model(**inputs)
        if _is_bare(model):
            return embedding(model, out.last_hidden_state, inputs.get("attention_mask"))
        return out.logits

    def kd_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``output`` plus the ``[B, L, hidden]`` output of every ORIGINAL encoder layer (pruning
        keeps the hidden size, so layer ``i`` of a slim model pairs with layer ``i`` of the
        original; a removed layer's output is its input, as in the gated model:
        :func:`hawada.adapters.hf_layers.expand_states`)."""
        inputs = self.model_inputs(batch)
        out = model(**inputs, output_hidden_states=True)
        # [0] is the embeddings' output
        config = getattr(getattr(model, "module", model), "config", None)  # DDP holds the model in .module
        states = hf_layers.expand_states(config, out.hidden_states[0], list(out.hidden_states[1:]))
        if _is_bare(model):
            return embedding(model, out.last_hidden_state, inputs.get("attention_mask")), states
        return out.logits, states

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> Any:
        g = torch.Generator().manual_seed(0)
        cfg = model.config
        dev = next(model.parameters()).device
        if hasattr(cfg, "vocab_size") and not hasattr(cfg, "image_size"):
            length = 11
            ids = torch.randint(0, cfg.vocab_size, (batch_size, length), generator=g)
            mask = torch.ones(batch_size, length, dtype=torch.long)
            mask[1:, length - 4 :] = 0  # padding in every row but the first
            return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}
        x = torch.randn(batch_size, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
        return {"pixel_values": x.to(dev, next(model.parameters()).dtype)}

    def check_output(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            out = model(**self.model_inputs(inputs))
        return out.last_hidden_state if _is_bare(model) else out.logits

    # ------------------------------------------------------------------ proxy
    def cost_terms(self, model: nn.Module, example_inputs: Any) -> list[CostTerm]:
        """Per layer: q/k/v/o linears, the attention op, the FFN linears and activation, two norms.

        Shapes come from ``example_inputs`` (``input_ids`` ``[B, L]`` or ``pixel_values``).
        """
        style, _, layers = _style_and_layers(model)
        hd = _head_dim(model, style, layers)
        p = STYLES[style]
        store: GateStore | None = gates_of(model)
        names = {s.name for s in store.segments} if store is not None else set()
        inputs = self.model_inputs(example_inputs)
        cfg = model.config
        if "input_ids" in inputs:
            b, seq = inputs["input_ids"].shape
        else:
            x = inputs["pixel_values"]
            b = x.shape[0]
            seq = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size) + 1
        b, seq = int(b), int(seq)
        tokens = b * seq
        hidden = cfg.hidden_size
        terms: list[CostTerm] = []

        def lin(name: str, dims: tuple, fin: int, fout: int, in_mult: int = 1, out_mult: int = 1) -> None:
            terms.append(
                CostTerm(
                    name,
                    "linear",
                    dims,
                    2.0 * tokens * fin * fout,
                    4.0 * (tokens * fin + tokens * fout + fin * fout),
                    {"tokens": tokens, "in_mult": in_mult, "out_mult": out_mult},
                )
            )

        def norm(name: str, dim, width: int) -> None:
            terms.append(
                CostTerm(
                    name, "norm_act", (dim,), 8.0 * tokens * width, 8.0 * tokens * width, {"tokens": tokens}
                )
            )

        for i, layer in enumerate(layers):
            heads = get_path(layer, p["q"]).out_features // hd
            ffn = get_path(layer, p["up"]).out_features
            hseg = f"layer{i}.heads" if f"layer{i}.heads" in names else heads
            fseg = f"layer{i}.ffn" if f"layer{i}.ffn" in names else ffn
            start = len(terms)
            for key in ("q", "k", "v"):
                lin(f"layer{i}.{key}", (hidden, hseg), hidden, heads * hd, out_mult=hd)
            terms.append(
                CostTerm(
                    f"layer{i}.attention",
                    "attention",
                    (hseg,),
                    4.0 * b * heads * seq * seq * hd,
                    4.0 * (4 * b * heads * seq * hd + b * heads * seq * seq),
                    {"batch": b, "seq": seq, "head_dim": hd},
                )
            )
            lin(f"layer{i}.o", (hseg, hidden), heads * hd, hidden, in_mult=hd)
            norm(f"layer{i}.norm1", hidden, hidden)
            lin(f"layer{i}.up", (hidden, fseg), hidden, ffn)
            norm(f"layer{i}.act", fseg, ffn)
            lin(f"layer{i}.down", (fseg, hidden), ffn, hidden)
            norm(f"layer{i}.norm2", hidden, hidden)
            if hf_layers.segment_name(i) in names:  # a removed layer costs none of its terms
                for t in terms[start:]:
                    t.scale = hf_layers.segment_name(i)
        return terms

    # ------------------------------------------------------------------ export
    def export_keepall(self, gated: nn.Module) -> nn.Module:
        return clone_without_gates(gated)

    @torch.no_grad()
    def export_pruned(self, gated: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        style, _, _ = _style_and_layers(gated)
        slim = clone_without_gates(gated)
        _, path, layers = _style_and_layers(slim)
        kept = hf_layers.kept_layers(keep, len(layers))
        hd = _head_dim(slim, style, layers)
        p = STYLES[style]
        hidden = slim.config.hidden_size
        for i, layer in enumerate(layers):
            if i not in kept:  # removed below: nothing to slice
                continue
            kh = keep.get(f"layer{i}.heads")
            if kh is not None:
                kh = kh.long().cpu()
                feat = (kh.view(-1, 1) * hd + torch.arange(hd).view(1, -1)).reshape(-1)
                o = slice_linear(get_path(layer, p["o"]), in_idx=feat)
                if kh.numel() == 0:
                    if style == "bert":
                        remote.set_path(layer, p["attn"], EmptyAttention())
                        remote.set_path(layer, p["o"], o)
                    else:
                        remote.set_path(layer, p["attn"], EmptyAttention(o))
                else:
                    for key in ("q", "k", "v"):
                        remote.set_path(layer, p[key], slice_linear(get_path(layer, p[key]), out_idx=feat))
                    remote.set_path(layer, p["o"], o)
                    set_attention_heads(get_path(layer, p["attn"]), style, int(kh.numel()), hd)
            kf = keep.get(f"layer{i}.ffn")
            if kf is not None:
                kf = kf.long().cpu()
                remote.set_path(layer, p["up"], slice_linear(get_path(layer, p["up"]), out_idx=kf))
                remote.set_path(layer, p["down"], slice_linear(get_path(layer, p["down"]), in_idx=kf))
        del hidden
        owner, _, attr = path.rpartition(".")
        hf_layers.remove_layers(slim, get_path(slim, owner) if owner else slim, attr, kept)
        _record_layout(slim, hd)  # hd: no module may be left to tell it (every head removed)
        slim.train(gated.training)
        return slim

    def uniform_policy(self, gated: nn.Module, policy: Any) -> Any:
        """Every layer keeps the same head count and FFN width: the mean over layers of the open
        units, rounded by ``policy``'s rounding for that kind. BERT-style configs cannot express a
        head size other than hidden / heads, so BERT-style layers keep all their heads (a stock
        config must be able to describe the result).

        Layer gates are left as they are: a uniform model with fewer layers is still a stock
        config, so the layers the gates close are removed, and the means are over the layers that
        stay."""
        store: GateStore = store_of(gated)
        style, _, _ = _style_and_layers(gated)
        open_u = [float(v) for v in store.open_units().tolist()]
        removed = {s.layer for s, o in zip(store.segments, open_u) if s.kind == "layer" and o <= 0}
        counts: dict[str, int] = {}
        for kind in ("head", "ffn"):
            segs = [(s, o) for s, o in zip(store.segments, open_u) if s.kind == kind]
            if not segs:
                continue
            units = segs[0][0].units
            staying = [(s, o) for s, o in segs if s.layer not in removed] or segs
            if kind == "head" and style == "bert":
                k = units
            else:
                mean = sum(o for _, o in staying) / len(staying)
                if kind == "ffn":  # whole gate groups
                    g = segs[0][0].group_size
                    mean = round(mean / g) * g
                r = (policy or ExportPolicy()).rounding_for(kind)
                k = int(round(mean)) if r is None else r.apply(int(round(mean)), units)
                k = max(1, min(k, units))
            for s, _ in segs:
                counts[s.name] = k
        return dataclasses.replace(policy or ExportPolicy(), counts=counts)

    # ------------------------------------------------------------------ files
    def load_model(self, arch: str, num_classes: int, path: str | None = None) -> nn.Module:
        """A pretrained encoder from the local folder ``path`` (nothing is downloaded): a saved slim
        model, the classifier its config declares, or the bare encoder (see :func:`load_pretrained`).
        ``kd_kind`` follows: ``logits`` for a classifier, ``embedding`` for a bare encoder. A
        sentence-transformers folder gives its Transformer module's encoder, with the pooling its
        modules declare recorded on the model (:func:`apply_folder_pooling`)."""
        if path is None:
            raise InputError("model.path: the hf_encoder family needs a local model folder")
        if not os.path.isdir(path):
            raise PathNotFoundError(f"model.path: folder not found: {path}")
        if declares_layout(path):
            return apply_folder_pooling(self.load(path), path)
        model = apply_folder_pooling(load_pretrained(st_folder.transformer_folder(path)), path)
        self.kd_kind = "embedding" if _is_bare(model) else "logits"
        return model.eval()

    def save(self, model: nn.Module, path: str) -> None:
        save_encoder(model, path)

    def load(self, path: str) -> nn.Module:
        model = load_encoder(path)
        self.kd_kind = "embedding" if _is_bare(model) else "logits"
        return model

    def layout(self, model: nn.Module) -> dict:
        return _layout(model)


def apply_folder_pooling(model: nn.Module, path: str) -> nn.Module:
    """Record on ``model`` the pooling of the sentence-transformers folder ``path`` (its modules are
    what ``SentenceTransformer(path)`` applies); a plain folder leaves the model as it is."""
    pooling = st_folder.folder_pooling(path)
    if pooling is not None:
        st_folder.set_pooling(model, pooling)
    return model


def _layout(model: nn.Module, head_dim: int | None = None) -> dict:
    """:meth:`HFEncoderAdapter.layout`; ``head_dim``: the head size when the caller knows it (a
    model whose heads were all removed keeps no module that tells it)."""
    style, _, layers = _style_and_layers(model) if not _has_empty(model) else _loose_layers(model)
    hd = head_dim or _head_dim_any(model, style, layers)
    p = STYLES[style]
    out = []
    for layer in layers:
        attn = get_path(layer, p["attn"])
        if isinstance(attn, EmptyAttention):
            width = 0
        else:
            width = get_path(layer, p["q"]).out_features
        out.append({"attn": int(width), "ffn": int(get_path(layer, p["up"]).out_features)})
    return {
        "family": HFEncoderAdapter.family,
        "class": remote.stock_name(type(model).__name__),
        "style": style,
        "head_dim": int(hd),
        "layers": out,
        **hf_layers.depth_summary(model.config, len(out)),
    }


def _has_empty(model: nn.Module) -> bool:
    return any(isinstance(m, EmptyAttention) for m in model.modules())


def _loose_layers(model: nn.Module) -> tuple[str, str, nn.ModuleList]:
    """Style and layers of a slim model (some attentions may be empty)."""
    found = encoder_layers(model)
    if found is None:
        raise LayoutError(f"{type(model).__name__}: no encoder layer list found")
    path, layers = found
    for layer in layers:
        st = remote.layer_style(layer)
        if st is not None:
            return st, path, layers
    # every layer's heads removed: tell the styles apart by their FFN module
    for style, pth in STYLES.items():
        if isinstance(get_path(layers[0], pth["up"]), nn.Linear):
            return style, path, layers
    raise LayoutError(f"{type(model).__name__}: unknown encoder layout")


def _head_dim_any(model: nn.Module, style: str, layers: nn.ModuleList) -> int:
    lay = getattr(model.config, "hawada_layout", None)
    if lay:
        return int(lay["head_dim"])
    for layer in layers:
        attn = get_path(layer, STYLES[style]["attn"])
        if not isinstance(attn, EmptyAttention):
            return int(getattr(attn, "attention_head_size", None) or attn.head_dim)
    raise LayoutError("cannot tell the head size of a model whose heads were all removed")


def _is_uniform(lay: dict) -> bool:
    return len({(x["attn"], x["ffn"]) for x in lay["layers"]}) == 1


def _stock_loadable(lay: dict, cfg: Any) -> bool:
    """True when the stock fields of ``cfg`` alone describe the widths of ``lay``."""
    if not _is_uniform(lay):
        return False
    attn, ffn = lay["layers"][0]["attn"], lay["layers"][0]["ffn"]
    hd = getattr(cfg, "head_dim", None) if lay["style"] == "vit" else None
    hd = hd or cfg.hidden_size // cfg.num_attention_heads
    return attn > 0 and attn == cfg.num_attention_heads * hd and ffn == cfg.intermediate_size


def _record_layout(model: nn.Module, head_dim: int | None = None) -> dict:
    """Make ``model.config`` describe the model's widths: the stock fields when every layer has the
    same widths and the stock config can say them (the config stays a stock one: no layout, no
    ``auto_map``); otherwise the per-layer layout, in hf_remote's slim config class, whose
    ``save_pretrained`` writes the modeling file and ``auto_map`` (docs/DESIGN.md, "Saved models")."""
    lay = _layout(model, head_dim)
    cfg = model.config
    if _is_uniform(lay):
        attn, ffn = lay["layers"][0]["attn"], lay["layers"][0]["ffn"]
        heads = attn // lay["head_dim"]
        if lay["style"] == "vit" and heads > 0:
            cfg.num_attention_heads = heads
            cfg.head_dim = lay["head_dim"]
            cfg.intermediate_size = ffn
        elif lay["style"] == "bert" and heads > 0 and heads * lay["head_dim"] == cfg.hidden_size:
            cfg.num_attention_heads = heads
            cfg.intermediate_size = ffn
    layout = {"style": lay["style"], "head_dim": lay["head_dim"], "layers": lay["layers"]}
    if _stock_loadable(lay, cfg):
        remote.mark_stock(cfg)
    elif lay["class"] in remote.ENCODER_CLASSES:
        remote.mark_slim(cfg, lay["class"], layout)
    else:  # no slim class to load it with (the loader names the class); keep the layout on record
        cfg.hawada_layout = layout
    return lay


def stock_loadable(model: nn.Module) -> bool:
    """True when the model's stock config alone describes its shapes (plain ``from_pretrained``)."""
    return _stock_loadable(HFEncoderAdapter().layout(model), model.config)


def save_encoder(model: nn.Module, path: str) -> None:
    """The model's own ``save_pretrained`` (config with the layout, modeling file, safetensors
    weights), after :func:`_record_layout`, plus ``layout.json``: a description of the widths
    that the loaders do not need (``config.json`` holds what they read)."""
    lay = _record_layout(model)
    model.save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump({**lay, "stock_loadable": stock_loadable(model)}, f, indent=1)


def load_encoder(path: str) -> nn.Module:
    """Load a folder written by ``save_pretrained`` of a (slim or stock) encoder, or by
    :func:`save_encoder`; returns an instance of the stock transformers class.

    No remote code runs: the model is built by transformers' own ``from_pretrained`` (which also
    maps checkpoint key names) through HawAda's copy of the slim subclass, whose only change is
    to reshape the layers in ``__init__`` from ``config.hawada_layout``; the instance is then
    given back its stock class, and its config the slim config class when it has a layout.
    """
    if not os.path.isdir(path):
        raise PathNotFoundError(f"model folder not found: {path}")
    data = read_config_json(path)
    if data is None:
        raise PathNotFoundError(f"{path} has no config.json: not a saved Hugging Face model")
    names = data.get("architectures") or []
    if not names and os.path.isfile(os.path.join(path, LAYOUT_FILE)):
        with open(os.path.join(path, LAYOUT_FILE)) as f:
            names = [json.load(f).get("class", "")]
    name = remote.stock_name(str(names[0])) if names else ""
    slim_cls = getattr(remote, "Hawada" + name, None) if name in remote.ENCODER_CLASSES else None
    if slim_cls is None:
        raise InputError(f"{path}/config.json names an unsupported transformers class {name!r}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    model = slim_cls.from_pretrained(path, config=config, local_files_only=True)
    model.__class__ = slim_cls.__mro__[1]  # the stock class: the subclass adds no state or methods
    _record_layout(model)  # the config class follows the widths (a re-save writes a whole folder)
    return model.eval()
