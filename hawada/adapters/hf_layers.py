"""Whole transformer layers as gates, shared by the Hugging Face families (``hf_encoder``,
``hf_decoder``).

A layer gate is the segment ``layer{i}.layer`` (kind ``layer``, one unit): a
:class:`~hawada.core.hooks.LayerGate` makes the layer's output ``x + z (h - x)``, so a closed
layer is the identity on the residual stream and export removes it from the layer list.

A model with removed layers records which of the original layers it keeps in
``config.hawada_depth = {"layers": original count, "kept": [original index of each layer]}``
(absent when no layer was removed). Nothing loads differently because of it: the layer count is
the stock ``num_hidden_layers``; the record lets distillation pair a slim model's hidden states
with the teacher's layers (:func:`expand_states`) and the report name the removed layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawada.core.export import ExportRequestError
from hawada.core.gates import GateStore
from hawada.core.hooks import LayerGate, add_hook

DEPTH_ATTR = "hawada_depth"
# per-layer lists a config may carry, which must have one entry per layer
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types")


def segment_name(i: int) -> str:
    """The layer gate's segment of layer ``i``."""
    return f"layer{i}.layer"


def register_layer_gates(store: GateStore, n: int, group_size: int = 1) -> list[str]:
    """Register one ``layer`` segment (one unit) per layer; returns their names."""
    return [store.register(segment_name(i), "layer", 1, group_size, i).name for i in range(n)]


def hook_layer_gates(store: GateStore, layers: nn.ModuleList) -> None:
    """Put a :class:`LayerGate` on every layer whose segment is registered (before any other
    forward hook of the layer, so a recorded hidden state is the gated one)."""
    names = {s.name for s in store.segments}
    for i, layer in enumerate(layers):
        if segment_name(i) in names:
            add_hook(layer, LayerGate(store, segment_name(i)), with_kwargs=True, prepend=True)


def kept_layers(keep: dict[str, torch.Tensor], n: int) -> list[int]:
    """Indices of the layers the keep set holds (a layer without a gate is kept). Raises
    :class:`ExportRequestError` when every layer is closed: a transformer needs one layer (a model
    whose residual stream passes through no layer at all is refused, see docs/DESIGN.md,
    invariant 2)."""
    kept = [i for i in range(n) if keep.get(segment_name(i), torch.ones(1)).numel() > 0]
    if not kept:
        raise ExportRequestError(
            f"every one of the {n} layers is closed; a model without layers cannot be exported "
            "(keep at least one layer gate open, e.g. gates.min_keep.layer: 1 keeps them all)"
        )
    return kept


def original_layers(config: Any, n: int) -> list[int]:
    """The original index of each of the model's ``n`` layers (``range(n)`` when none was removed)."""
    rec = getattr(config, DEPTH_ATTR, None)
    return [int(i) for i in rec["kept"]] if rec else list(range(n))


def original_count(config: Any, n: int) -> int:
    """How many layers the original model had."""
    rec = getattr(config, DEPTH_ATTR, None)
    return int(rec["layers"]) if rec else n


def remove_layers(model: nn.Module, owner: nn.Module, attr: str, kept: list[int]) -> None:
    """In place: keep only layers ``kept`` of ``owner.<attr>`` (an ``nn.ModuleList``), and make
    everything that counts or indexes layers agree: ``config.num_hidden_layers``, per-layer config
    lists (``layer_types``), each module's ``layer_idx`` (the KV cache's slot: 0..n-1 in order) and
    :data:`DEPTH_ATTR` (original indices, composed with an earlier removal)."""
    layers = getattr(owner, attr)
    n = len(layers)
    if kept == list(range(n)):
        return
    cfg = model.config
    source = original_layers(cfg, n)
    total = original_count(cfg, n)
    setattr(owner, attr, nn.ModuleList([layers[i] for i in kept]))
    for j, layer in enumerate(getattr(owner, attr)):
        for mod in layer.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                mod.layer_idx = j
    for key in PER_LAYER_LISTS:
        values = getattr(cfg, key, None)
        if isinstance(values, list | tuple) and len(values) == n:
            setattr(cfg, key, [values[i] for i in kept])
    cfg.num_hidden_layers = len(kept)
    setattr(cfg, DEPTH_ATTR, {"layers": total, "kept": [source[i] for i in kept]})


def expand_states(config: Any, first: torch.Tensor, states: list[torch.Tensor]) -> list[torch.Tensor]:
    """One ``[B, L, D]`` state per ORIGINAL layer from a model's per-layer outputs ``states``.

    A removed layer's output is its input, the last kept layer's output before it (``first``, the
    embeddings' output, when there is none): exactly what the gated model gives for a closed layer,
    so layer ``i`` of a slim model still pairs with layer ``i`` of the teacher.
    """
    rec = getattr(config, DEPTH_ATTR, None)
    if not rec:
        return states
    by_source = dict(zip((int(i) for i in rec["kept"]), states))
    out, last = [], first
    for i in range(int(rec["layers"])):
        last = by_source.get(i, last)
        out.append(last)
    return out


def depth_summary(config: Any, n: int) -> dict:
    """``{"layers_of": original count, "kept_layers": [...]}`` when layers were removed, else ``{}``
    (the keys a family's ``layout`` adds)."""
    rec = getattr(config, DEPTH_ATTR, None)
    if not rec:
        return {}
    return {"layers_of": original_count(config, n), "kept_layers": original_layers(config, n)}
