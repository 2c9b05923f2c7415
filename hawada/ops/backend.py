"""The one backend switch, ``HAWADA_BACKEND=auto|triton|torch``.

* ``torch``: always the torch reference.
* ``triton``: the Triton kernels; raises :class:`BackendUnavailableError` when they cannot run
  (Triton missing, or CPU tensors without ``TRITON_INTERPRET=1``).
* ``auto`` (default): Triton for CUDA tensors when Triton imports, else the torch reference,
  silently. CPU tensors always take the torch path under ``auto``, even with the interpreter on:
  the interpreter is a correctness tool, far slower than torch.

Triton is imported lazily, once; importing :mod:`hawada.ops` never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from hawada.errors import InputError

BACKENDS = ("auto", "triton", "torch")
_forced: str | None = None


class BackendUnavailableError(InputError):
    """An explicitly requested backend cannot run here."""


def backend_setting() -> str:
    """The requested backend: :func:`use_backend` inside its block, else ``$HAWADA_BACKEND``."""
    name = _forced if _forced is not None else os.environ.get("HAWADA_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise InputError(f"HAWADA_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Select a backend inside the block (takes precedence over ``$HAWADA_BACKEND``)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    prev, _forced = _forced, name
    try:
        yield
    finally:
        _forced = prev


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """``None`` when ``import triton`` works, else the reason it does not (cached)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # any failure (missing, broken install) means "no Triton"
        return f"{type(e).__name__}: {e}"
    return None


def interpreter_on() -> bool:
    """True when Triton's CPU interpreter is enabled (must be set before any kernel is defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not_triton(tensors: tuple[torch.Tensor, ...]) -> str | None:
    err = triton_import_error()
    if err is not None:
        return f"triton cannot be imported ({err})"
    devs = {t.device.type for t in tensors}
    if devs == {"cuda"}:
        return None
    if devs == {"cpu"}:
        return None if interpreter_on() else "CPU tensors need TRITON_INTERPRET=1 for the triton backend"
    return f"triton kernels need all tensors on CUDA, got devices {sorted(devs)}"


def resolve_backend(*tensors: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op on ``tensors``; raises if ``triton`` was asked and cannot run."""
    name = backend_setting()
    if name == "torch":
        return "torch"
    why = _why_not_triton(tensors)
    if name == "triton":
        if why is not None:
            raise BackendUnavailableError(f"HAWADA_BACKEND=triton: {why}")
        return "triton"
    # auto: only real GPUs take the kernels
    if why is None and all(t.device.type == "cuda" for t in tensors):
        return "triton"
    return "torch"
