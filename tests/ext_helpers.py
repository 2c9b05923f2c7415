"""Shared by the tests of the compiled extension: the fixture that loads it."""

import os

import pytest

from hawada import _ext


def require_ext():
    """The loaded ``hawada._C``. Skips when it is not built, unless ``HAWADA_EXT=require`` (set by
    ``make test`` after building it), where a missing build fails instead."""
    _ext.reset()
    mod = _ext.load()  # raises ExtensionError under HAWADA_EXT=require
    if mod is None:
        if os.environ.get("HAWADA_EXT", "auto") == "require":
            pytest.fail("HAWADA_EXT=require but hawada._C is not loaded")
        pytest.skip("hawada._C is not built (make ext)")
    return mod
