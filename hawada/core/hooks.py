"""Attaching gates to stock modules without changing their forward.

Masks are applied by forward hooks that are callable objects (not closures), so a
``deepcopy`` of a gated model carries hooks that point at the copy's own GateStore.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawada.core.gates import GateStore
from hawada.core.protocol import AdapterLike

STORE_ATTR = "hawada_gates"
ADAPTER_ATTR = "_hawada_adapter"


def gates_of(model: nn.Module) -> GateStore | None:
    """The GateStore attached to ``model`` (the submodule named :data:`STORE_ATTR`), or None."""
    store = getattr(model, STORE_ATTR, None)
    return store if isinstance(store, GateStore) else None


class MaskOutput:
    """Forward hook: multiply a module's output by a segment's unit mask along ``dim``."""

    _hawada_gate = True

    def __init__(self, store: GateStore, segment: str, dim: int = 1) -> None:
        self.store, self.segment, self.dim = store, segment, dim

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        m = self.store.unit_mask(self.segment).to(output.dtype)
        shape = [1] * output.dim()
        shape[self.dim] = m.numel()
        return output * m.view(shape)


class LayerGate:
    """Forward hook (with kwargs) on a whole transformer layer: its output ``h`` becomes
    ``x + z (h - x)``, ``x`` the layer's input hidden states and ``z`` the segment's one-unit mask.

    A closed layer (z = 0) is exactly the identity on the residual stream, so removing it from
    the layer list changes nothing; an open one (z = 1) is exactly the stock output.
    ``torch.lerp`` computes ``x + z (h - x)`` for z < 1/2 and ``h - (1 - z)(h - x)`` otherwise,
    so both ends are exact, not only within rounding. ``x`` is the first positional argument or
    the ``hidden_states`` keyword; an output tuple (``[B, L, D]`` first) keeps its other items.
    """

    _hawada_gate = True

    def __init__(self, store: GateStore, segment: str, arg: str = "hidden_states") -> None:
        self.store, self.segment, self.arg = store, segment, arg

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs[self.arg]
        h = output[0] if isinstance(output, tuple) else output
        z = self.store.unit_mask(self.segment).to(h.dtype).reshape(())
        out = torch.lerp(x, h, z)
        return (out, *output[1:]) if isinstance(output, tuple) else out


class RefreshGates:
    """Forward pre-hook on the model root: each forward samples its gates once."""

    _hawada_gate = True

    def __init__(self, store: GateStore) -> None:
        self.store = store

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.store.refresh()


class GatedLinear(nn.Linear):
    """An ``nn.Linear`` whose output (``side="out"``) or input (``side="in"``) features are gated.

    Made in place from a stock ``nn.Linear`` by :func:`gate_linear` (class swap: same
    parameters, same state-dict keys, same hooks); :func:`strip_gate_hooks` swaps it back.
    The forward calls the fused op :func:`hawada.ops.gated_linear`.
    """

    _hawada_store: GateStore
    _hawada_segment: str
    _hawada_side: str
    _hawada_epu: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from hawada.ops import gated_linear

        store, seg = self._hawada_store, self._hawada_store.segment(self._hawada_segment)
        # A unit may span several features (an attention head spans head_dim input columns).
        epu = self._hawada_epu
        mask = store.gate_mask()[seg.start : seg.stop]
        if store._override is not None and seg.name in store._override:
            mask, group = store.unit_mask(seg.name), epu
        else:
            group = seg.group_size * epu
        return gated_linear(x, self.weight, self.bias, mask, self._hawada_side, group)


def gate_linear(
    module: nn.Linear, store: GateStore, segment: str, side: str, elements_per_unit: int = 1
) -> None:
    """In place: make ``module`` a :class:`GatedLinear` reading ``segment`` of ``store``.

    ``elements_per_unit``: features one unit of the segment covers (e.g. ``head_dim`` when the
    segment counts attention heads); the gated side must have ``units * elements_per_unit``.
    """
    if type(module) is not nn.Linear:
        raise TypeError(f"gate_linear expects a plain nn.Linear, got {type(module).__name__}")
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    if elements_per_unit < 1:
        raise ValueError(f"elements_per_unit must be >= 1, got {elements_per_unit}")
    seg = store.segment(segment)
    width = module.out_features if side == "out" else module.in_features
    if seg.units * elements_per_unit != width:
        raise ValueError(
            f"segment {segment!r} has {seg.units} units x {elements_per_unit} features but the linear "
            f"has {width} {side} features"
        )
    module.__class__ = GatedLinear
    # Plain attributes (not a registered submodule): the store belongs to the model root.
    module.__dict__.update(
        _hawada_store=store, _hawada_segment=segment, _hawada_side=side, _hawada_epu=int(elements_per_unit)
    )


def add_hook(
    module: nn.Module, hook: Any, pre: bool = False, with_kwargs: bool = False, prepend: bool = False
) -> None:
    """Register a gate hook (marked so that export can strip it). ``prepend``: run before the
    module's other hooks, including ones registered later with ``prepend=False`` (transformers
    records a layer's output for ``output_hidden_states`` by a forward hook that may be installed
    after the gates: it must see the gated output)."""
    if pre:
        module.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend)
    else:
        module.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=prepend)


def install_store(model: nn.Module, store: GateStore, adapter: AdapterLike) -> None:
    """Make ``store`` the model's GateStore and remember the adapter that built it."""
    if hasattr(model, STORE_ATTR):
        raise ValueError("model already has gates attached")
    p = next(model.parameters(), None)
    if p is not None:
        store.to(p.device)
    setattr(model, STORE_ATTR, store)
    model.__dict__[ADAPTER_ATTR] = adapter
    add_hook(model, RefreshGates(store), pre=True)


def strip_gate_hooks(model: nn.Module) -> nn.Module:
    """In place: remove every gate hook, the GateStore and the adapter reference."""
    for mod in model.modules():
        for d in (mod._forward_hooks, mod._forward_pre_hooks):
            for k in [k for k, h in d.items() if getattr(h, "_hawada_gate", False)]:
                del d[k]
                mod._forward_hooks_with_kwargs.pop(k, None)
                mod._forward_pre_hooks_with_kwargs.pop(k, None)
        if isinstance(mod, GatedLinear):
            mod.__class__ = nn.Linear
            for a in ("_hawada_store", "_hawada_segment", "_hawada_side", "_hawada_epu"):
                mod.__dict__.pop(a, None)
    if STORE_ATTR in model._modules:
        del model._modules[STORE_ATTR]
    model.__dict__.pop(ADAPTER_ATTR, None)
    return model
