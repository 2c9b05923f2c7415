"""The public entry points: attach gates, reach the store, export."""

from __future__ import annotations

from torch import nn

from hawada.adapters.base import adapter_for
from hawada.core.export import ExportPolicy, export_keepall, store_of
from hawada.core.export import export as _export
from hawada.core.gates import GateConfig, GateStore


def attach(model: nn.Module, config: GateConfig | None = None) -> nn.Module:
    """Attach trainable gates in place (adapter picked from the model's type); returns ``model``."""
    return adapter_for(model).attach(model, config or GateConfig())


def gates(model: nn.Module) -> GateStore:
    """The GateStore of a gated model: ``.logits`` (one 1-D parameter) and ``.segments``."""
    return store_of(model)


def export(gated: nn.Module, policy: ExportPolicy | None = None, example_inputs=None) -> nn.Module:
    """A new, physically smaller plain model; ``gated`` is untouched (see core.export.export)."""
    return _export(gated, policy, example_inputs)


__all__ = ["attach", "gates", "export", "export_keepall"]
