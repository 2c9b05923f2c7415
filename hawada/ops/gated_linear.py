"""Gated linear: a linear layer whose output features (``side="out"``) or input features
(``side="in"``) are multiplied by per-group gates."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_group_mask(mask: torch.Tensor, group_size: int, features: int) -> torch.Tensor:
    """``[G] -> [features]``: gate ``g`` covers features ``[g * group_size, (g + 1) * group_size)``."""
    if group_size == 1:
        return mask
    return mask.repeat_interleave(group_size)[:features]


def gated_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str = "out",
    group_size: int = 1,
) -> torch.Tensor:
    """Torch reference.

    Shapes: ``x`` ``[..., K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None, ``mask``
    ``[ceil(N / group_size)]`` (side ``out``) or ``[ceil(K / group_size)]`` (side ``in``);
    returns ``[..., N]``. ``out``: ``(x W^T + b) * m``; ``in``: ``(x * m) W^T + b``.
    """
    if side == "out":
        m = expand_group_mask(mask, group_size, weight.shape[0]).to(x.dtype)
        return F.linear(x, weight, bias) * m
    if side == "in":
        m = expand_group_mask(mask, group_size, weight.shape[1]).to(x.dtype)
        return F.linear(x * m, weight, bias)
    raise ValueError(f"gated_linear side must be 'out' or 'in', got {side!r}")


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str = "out",
    group_size: int = 1,
) -> torch.Tensor:
    """Gated linear (see :func:`gated_linear_ref`); dispatches to the selected backend."""
    return gated_linear_ref(x, weight, bias, mask, side, group_size)
