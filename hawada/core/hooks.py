"""Attaching gates to stock modules without changing their forward.

Masks are applied by forward hooks that are callable objects (not closures), so a
``deepcopy`` of a gated model carries hooks that point at the copy's own GateStore.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawada.core.gates import GateStore

STORE_ATTR = "hawada_gates"
ADAPTER_ATTR = "_hawada_adapter"


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


class RefreshGates:
    """Forward pre-hook on the model root: each forward samples its gates once."""

    _hawada_gate = True

    def __init__(self, store: GateStore) -> None:
        self.store = store

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.store.refresh()


def add_hook(module: nn.Module, hook: Any, pre: bool = False, with_kwargs: bool = False) -> None:
    """Register a gate hook (marked so that export can strip it)."""
    if pre:
        module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    else:
        module.register_forward_hook(hook, with_kwargs=with_kwargs)


def install_store(model: nn.Module, store: GateStore, adapter: Any) -> None:
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
    if STORE_ATTR in model._modules:
        del model._modules[STORE_ATTR]
    model.__dict__.pop(ADAPTER_ATTR, None)
    return model
