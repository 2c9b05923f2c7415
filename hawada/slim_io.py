"""Saving and loading slim models of any family.

A Hugging Face model (families ``hf_encoder``, ``hf_decoder``) is saved by its own
``save_pretrained``: its config carries the layout and names the modeling file for
``trust_remote_code`` loading when the widths are non-uniform (docs/DESIGN.md, "Saved models");
:func:`save_slim` adds only ``layout.json``, a description of the widths. Other families write
``layout.json`` with their weights, and it names the family.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from hawada.adapters.base import adapter_for, get_adapter
from hawada.errors import InputError, PathNotFoundError
from hawada.hf_remote.folder import LAYOUT_FILE, hf_family, read_config_json


def save_slim(model: nn.Module, path: str) -> None:
    """Write a plain (slim or original) model into the folder ``path`` with its layout."""
    adapter_for(model).save(model, path)


def _family(path: str) -> str:
    lay = os.path.join(path, LAYOUT_FILE)
    if os.path.isfile(lay):
        with open(lay) as f:
            family = json.load(f).get("family")
        if not family:
            raise InputError(f"{lay} names no model family")
        return family
    cfg = read_config_json(path)
    if cfg is None:
        raise PathNotFoundError(f"{path} has neither layout.json nor config.json: not a saved model")
    family = hf_family(cfg)
    if family is None:
        arch = (cfg.get("architectures") or ["(none)"])[0]
        raise InputError(f"{path}/config.json declares {arch}, a class no HawAda family saves and loads")
    return family


def load_slim(path: str) -> nn.Module:
    """Load a folder written by :func:`save_slim`, or by the ``save_pretrained`` of a (slim or
    stock) Hugging Face model of a supported class, with stock classes (no remote code)."""
    if not os.path.isdir(path):
        raise PathNotFoundError(f"model folder not found: {path}")
    return get_adapter(_family(path)).load(path)


def example_inputs_for(model: nn.Module, batch_size: int | None = None) -> Any:
    """A probe batch for ``model`` from its family's adapter."""
    return adapter_for(model).example_inputs(model, batch_size or 2)
