"""What core calls on an adapter (docs/DESIGN.md, "The adapter contract").

Core never imports an adapter; it types the adapter object it is handed with this protocol.
``hawada.adapters.base.Adapter`` is the base class every family implements, and it satisfies it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class AdapterLike(Protocol):
    """The adapter methods the family-agnostic engine uses (export, distillation, checks)."""

    family: str
    kd_kind: str  # "logits" (KL on class/token logits) or "embedding" (cosine + MSE)

    def model_inputs(self, batch: Any) -> Any:
        """What to call the model with for one data batch (tensor, tuple or kwargs dict)."""

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The tensor distillation compares: logits ``[B, C]`` / ``[B, L, V]`` or embeddings ``[B, D]``."""

    def kd_outputs(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """``(output, per-layer hidden states [B, L, D] or None)``."""

    def kd_mask(self, batch: Any) -> torch.Tensor | None:
        """``[B, L]`` token mask for per-token KD; None for per-example outputs."""

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> Any:
        """A small probe batch for export checks."""

    def check_output(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The output the export check compares (invariant 2)."""

    def export_keepall(self, gated: nn.Module) -> nn.Module:
        """The original architecture without gates (a new model)."""

    def export_pruned(self, gated: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        """A new plain model keeping, per segment, the unit indices in ``keep``."""
