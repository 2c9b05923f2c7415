"""The base classes of HawAda's input errors (docs/DESIGN.md, "Failure").

An :class:`InputError` says that what the user gave (a recipe, a command-line argument, a model or
data folder, an environment setting) cannot be used, in one line that names it; the ``hawada``
command prints that line and exits with code 2. Every other exception is a bug inside HawAda (or
below it) and keeps its traceback (exit code 1). Checks of internal invariants and of arguments
passed between HawAda's own functions stay plain ``ValueError``/``TypeError``/``RuntimeError``.

This module imports nothing from the package, so every layer may raise these.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user, reported as one line (a ``ValueError``, as before)."""


class PathNotFoundError(InputError, FileNotFoundError):
    """A file or folder the user named is missing, or lacks a file it must hold (also a
    ``FileNotFoundError``)."""
