"""Settings with range metadata: the engine's dataclasses are also the recipe's schema.

Every settings dataclass of the engine (``GateConfig``, ``PenaltyWeights``, ``KDConfig``,
``TrainConfig``, ``FinetuneConfig``, ``MeasureConfig``, ``ProxyConfig``, ``SearchConfig``)
declares its fields with :func:`knob`, so one set of defaults and ranges serves both the Python
API and the YAML recipe (``hawada.config`` reads the same metadata, docs/DESIGN.md "Settings").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from hawada.errors import InputError

FROM_RUN = "from_run"  # metadata key: the field is set by the run from another recipe key


def knob(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    help: str = "",
    from_run: str | None = None,
) -> Any:
    """A dataclass field with its accepted range (``lo``/``hi``, ``lo_open``: strictly above lo).

    ``from_run``: the recipe key the run fills this field from (e.g. the top-level ``seed``); such a
    field is not a key of the recipe section the dataclass forms.
    """
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "help": help, FROM_RUN: from_run}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_range(value: Any, meta: typing.Mapping, where: str) -> None:
    """Raise ``ValueError("<where>: must be ...")`` when a number (or each number of a list) is out of range."""
    if isinstance(value, list | tuple):
        for v in value:
            check_range(v, meta, where)
        return
    if isinstance(value, typing.Mapping):  # e.g. gates.group_size: {kind: count}
        for k, v in value.items():
            check_range(v, meta, f"{where}.{k}")
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InputError(f"{where}: must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise InputError(f"{where}: must be <= {hi:g}, got {value!r}")


def literal_values(tp: Any) -> tuple | None:
    """The values a ``Literal`` (possibly inside ``X | None`` or ``list[...]``) allows; None otherwise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return typing.get_args(tp)
    if origin in (typing.Union, types.UnionType, list, tuple):
        for a in typing.get_args(tp):
            vals = literal_values(a)
            if vals is not None:
                return vals
    return None


def check_fields(obj: Any, where: str) -> None:
    """Check every field of a settings dataclass against its range and its ``Literal`` values.

    Called from ``__post_init__``: the API and the recipe refuse the same values with the same words.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{where}.{f.name}"
        check_range(value, f.metadata, path)
        allowed = literal_values(hints[f.name])
        if allowed is None or value is None:
            continue
        for v in value if isinstance(value, list | tuple) else [value]:
            if v not in allowed:
                raise InputError(f"{path}: {v!r} is not one of {', '.join(map(str, allowed))}")
