"""What a saved Hugging Face folder declares, read from its ``config.json`` (HawAda's side: this
file is not copied into saved folders)."""

from __future__ import annotations

import json
import os

from hawada.errors import InputError

LAYOUT_FILE = "layout.json"


def read_config_json(path: str) -> dict | None:
    """The folder's ``config.json`` as a dict; None when it has none."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg}: not a readable JSON config ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise InputError(f"{cfg}: not a JSON object")
    return data


def declares_layout(path: str) -> bool:
    """True for a folder written by HawAda for a slim model whose widths its stock config cannot
    describe: a ``layout.json`` beside the weights, or ``hawada_layout`` in ``config.json``."""
    if os.path.isfile(os.path.join(path, LAYOUT_FILE)):
        return True
    cfg = read_config_json(path)
    return bool(cfg and cfg.get("hawada_layout"))


def architecture(config: dict) -> str | None:
    """The stock class name ``config.json`` declares (``architectures[0]``, ``Hawada`` removed)."""
    # imported here: the modeling file imports transformers, which reading a folder's JSON (and
    # importing the jobs that do) must not need
    from hawada.hf_remote.modeling_hawada import stock_name

    arch = config.get("architectures") or []
    return stock_name(str(arch[0])) if arch else None


def hf_family(config: dict) -> str | None:
    """``hf_encoder`` / ``hf_decoder`` for a config of a class one of them saves and loads."""
    from hawada.hf_remote.modeling_hawada import DECODER_CLASSES, ENCODER_CLASSES

    name = architecture(config)
    if name in ENCODER_CLASSES:
        return "hf_encoder"
    if name in DECODER_CLASSES:
        return "hf_decoder"
    return None
