"""Loader of the optional compiled extension ``hawada._C`` (batched slicing, latency loops).

Import never fails. :func:`load` returns the module, or None when it is missing, broken,
stale or switched off; every problem is logged once as a warning and the Python path is used.

Environment:
  ``HAWADA_EXT``       ``auto`` (default): load, warn once on failure; ``off``: never load;
                       ``require``: raise :class:`ExtensionError` instead of warning (CI sets
                       this after building, so a failed build fails tests instead of skipping)
  ``HAWADA_BACKEND``   ``torch`` also switches the extension off
  ``HAWADA_EXT_MODULE`` import this module instead of ``hawada._C`` (tests simulate a missing
                       or broken build with it)
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import logging
import os
import threading
from types import ModuleType

import torch

from hawada.errors import InputError

log = logging.getLogger("hawada")

ABI_VERSION = 1  # must equal kAbiVersion in csrc/bindings.cpp
_MODES = ("auto", "off", "require")
_lock = threading.Lock()
_state: dict[str, object] = {}


class ExtensionError(ImportError):
    """``HAWADA_EXT=require`` and the extension could not be used."""


def source_hash(folder: str) -> str:
    """SHA-256 (16 hex digits) of ``folder``'s ``*.cpp``, ``*.cu``, ``*.h`` (same as setup.py)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        if path.endswith((".cpp", ".cu", ".h")):
            h.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def mode() -> str:
    """``auto``, ``off`` or ``require`` from the environment (bad values raise ValueError)."""
    if os.environ.get("HAWADA_BACKEND", "auto").strip().lower() == "torch":
        return "off"
    m = os.environ.get("HAWADA_EXT", "auto").strip().lower()
    if m not in _MODES:
        raise InputError(f"HAWADA_EXT must be one of {_MODES}, got {m!r}")
    return m


def _why_unusable(mod: ModuleType) -> str | None:
    """None when ``mod`` matches this package; otherwise why it is stale."""
    if getattr(mod, "ABI_VERSION", None) != ABI_VERSION:
        return f"ABI version {getattr(mod, 'ABI_VERSION', None)} != {ABI_VERSION}"
    built = getattr(mod, "TORCH_VERSION", None)
    if built != torch.__version__:
        return f"built against torch {built}, running torch {torch.__version__}"
    # In a source checkout, a build older than the sources is stale (installed wheels carry no csrc/).
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    if os.path.isdir(csrc) and getattr(mod, "SOURCE_HASH", None) != source_hash(csrc):
        return "built from older sources than csrc/ (rebuild it)"
    return None


def load() -> ModuleType | None:
    """The extension module, or None (see module docstring); the outcome is cached."""
    with _lock:
        if "mod" in _state:
            return _state["mod"]  # type: ignore[return-value]
        m = mode()
        mod: ModuleType | None = None
        problem = None
        if m != "off":
            name = os.environ.get("HAWADA_EXT_MODULE", "hawada._C")
            try:
                mod = importlib.import_module(name)
            except Exception as e:  # a missing or broken build must never break `import hawada`
                problem = f"cannot import {name} ({type(e).__name__}: {e})"
            else:
                why = _why_unusable(mod)
                if why:
                    problem, mod = f"{name} is stale: {why}", None
        if problem:
            if m == "require":
                raise ExtensionError(f"HAWADA_EXT=require but {problem}")
            log.warning(
                "hawada: C++ extension not used, %s; using the Python path "
                "(build it with `make ext`, or set HAWADA_EXT=off to silence this)",
                problem,
            )
        _state["mod"] = mod
        _state["problem"] = problem
        return mod


def available() -> bool:
    """True when the extension is loaded and usable."""
    return load() is not None


def has_cuda() -> bool:
    """True when the loaded extension was built with its CUDA sources."""
    mod = load()
    return bool(mod is not None and mod.has_cuda())


def reset() -> None:
    """Forget the cached outcome (tests change the environment and load again)."""
    with _lock:
        _state.clear()
