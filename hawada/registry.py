"""A name -> entry registry whose built-in entries register themselves when their module is
imported, on the first lookup (adapters by model family, jobs by data kind)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def qualified_name(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry(Generic[T]):
    """Entries by name.

    ``builtin``: modules imported on the first lookup; they register their entries on import. A
    built-in module whose third-party library is not installed is skipped (that family or kind is
    then unknown); an import error inside HawAda itself is raised. ``unknown(name, known)`` makes
    the error a lookup of an unknown name raises. A name has one entry: registering another one
    under a taken name raises ValueError (the winner would depend on import order); registering
    the same object again (its module imported a second time) replaces it.
    """

    def __init__(
        self, what: str, builtin: tuple[str, ...], unknown: Callable[[str, list[str]], Exception]
    ) -> None:
        self.what, self.builtin, self.unknown = what, builtin, unknown
        self.entries: dict[str, T] = {}

    def add(self, names: tuple[str, ...], entry: T) -> None:
        for name in names:
            held = self.entries.get(name)
            if held is not None and qualified_name(held) != qualified_name(entry):
                raise ValueError(
                    f"{self.what} {name!r} is already registered ({qualified_name(held)}); "
                    f"refusing {qualified_name(entry)}"
                )
        for name in names:
            self.entries[name] = entry

    def load_builtin(self) -> None:
        for mod in self.builtin:
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:
                if e.name == mod or not (e.name or "").startswith("hawada"):
                    continue
                raise

    def get(self, name: str) -> T:
        self.load_builtin()
        if name not in self.entries:
            raise self.unknown(name, self.names())
        return self.entries[name]

    def names(self) -> list[str]:
        self.load_builtin()
        return sorted(self.entries)

    def __iter__(self) -> Iterator[T]:
        self.load_builtin()
        return iter(list(self.entries.values()))
