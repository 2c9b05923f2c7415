"""Saving and loading slim models of any family (the folder's layout.json names the family)."""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from hawada.adapters.base import adapter_for, get_adapter
from hawada.errors import InputError, PathNotFoundError


def save_slim(model: nn.Module, path: str) -> None:
    """Write a plain (slim or original) model into the folder ``path`` with its layout."""
    adapter_for(model).save(model, path)


def load_slim(path: str) -> nn.Module:
    """Load a folder written by :func:`save_slim` with stock classes (no remote code)."""
    lay = os.path.join(path, "layout.json")
    if not os.path.isfile(lay):
        raise PathNotFoundError(f"{path} has no layout.json: not a saved HawAda model")
    with open(lay) as f:
        family = json.load(f).get("family")
    if not family:
        raise InputError(f"{lay} names no model family")
    return get_adapter(family).load(path)


def example_inputs_for(model: nn.Module, batch_size: int | None = None) -> Any:
    """A probe batch for ``model`` from its family's adapter."""
    return adapter_for(model).example_inputs(model, batch_size or 2)
