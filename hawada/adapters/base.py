"""The adapter contract and the registry that picks an adapter from a model's type."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hawada.core.gates import GateConfig
from hawada.core.proxy_cost import CostTerm
from hawada.errors import InputError
from hawada.registry import Registry


class UnknownModelError(InputError):
    """No registered adapter recognises the model."""


class Adapter:
    """One model family. Subclasses implement every method below.

    ``kd_kind``: ``logits`` (KL on class/token logits) or ``embedding`` (cosine + MSE).
    ``default_group_size``: units per gate by kind, for kinds the GateConfig leaves unset.
    """

    family: str = "base"
    kd_kind: str = "logits"
    default_group_size: dict[str, int] = {}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def attach(self, model: nn.Module, config: GateConfig) -> nn.Module:
        """In place: register segments in a new GateStore and hook the masks; returns model."""
        raise NotImplementedError

    def model_inputs(self, batch: Any) -> Any:
        """What to call the model with for one data batch (tensor, tuple or kwargs dict)."""
        raise NotImplementedError

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The tensor distillation compares (logits ``[B, C]`` / ``[B, L, V]`` or embeddings ``[B, D]``)."""
        raise NotImplementedError

    def kd_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """``(output(model, batch), hidden states)`` for distillation: the ``[B, L, D]`` output of
        every layer whose width pruning keeps (student and teacher states pair up by index), or
        None where the family has no such states (``kd.alpha_hidden`` is then refused)."""
        return self.output(model, batch), None

    def kd_mask(self, batch: Any) -> torch.Tensor | None:
        """``[B, L]`` token mask for per-token KD; None for per-example outputs."""
        return None

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> Any:
        """A small probe batch for export checks."""
        raise NotImplementedError

    def check_output(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The output compared by the export check (invariant 2)."""
        raise NotImplementedError

    def cost_terms(self, model: nn.Module, example_inputs: Any) -> list[CostTerm]:
        """The latency proxy's terms for ``model`` at the shape of ``example_inputs``."""
        raise NotImplementedError

    def export_keepall(self, gated: nn.Module) -> nn.Module:
        raise NotImplementedError

    def export_pruned(self, gated: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """A new plain model keeping, per segment, the unit indices in ``keep``."""
        raise NotImplementedError

    def load_model(self, arch: str, num_classes: int, path: str | None = None) -> nn.Module:
        """The teacher named by a recipe's ``model`` section."""
        raise NotImplementedError

    def save(self, model: nn.Module, path: str) -> None:
        """Write a slim model into the folder ``path`` (weights + per-layer layout)."""
        raise NotImplementedError

    def load(self, path: str) -> nn.Module:
        """Inverse of :meth:`save`."""
        raise NotImplementedError

    def uniform_policy(self, gated: nn.Module, policy: Any) -> Any:
        """An export policy giving every layer the same widths (``export.uniform``)."""
        raise InputError(f"export.uniform is not supported by the {self.family!r} family")

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP shards one by one (each all-gathered for its own forward).

        Default: the children of the model's largest ``nn.ModuleList`` (a transformer's layers).
        """
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        if not lists:
            raise InputError(f"{type(model).__name__} has no layer list to shard: fsdp needs one")
        best = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        return list(best)

    def layout(self, model: nn.Module) -> dict:
        """Per-layer widths of a (slim or original) plain model, JSON-serialisable."""
        raise NotImplementedError


BUILTIN_FAMILIES = ("hawada.adapters.resnet", "hawada.adapters.hf_encoder", "hawada.adapters.hf_decoder")

ADAPTERS: Registry[type[Adapter]] = Registry(
    "model family",
    BUILTIN_FAMILIES,
    lambda name, known: UnknownModelError(f"unknown model family {name!r}; known: {', '.join(known)}"),
)


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter findable by family name and by model type."""
    ADAPTERS.add((cls.family,), cls)
    return cls


def families() -> list[str]:
    return ADAPTERS.names()


def get_adapter(family: str) -> Adapter:
    return ADAPTERS.get(family)()


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter whose family recognises ``model``."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls()
    raise UnknownModelError(
        f"no adapter recognises a model of type {type(model).__name__}; known families: "
        f"{', '.join(families())}"
    )
