"""The job contract and the registry that picks a job builder from a recipe's ``data.kind``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import Adapter
from hawada.config import Recipe


@dataclass
class Job:
    """What one data kind + model family needs from the pipeline.

    ``evaluate(teacher, student)`` returns agreement metrics; ``score_key`` names the one
    fine-tuning maximises. ``latency_inputs`` is the batch latency is measured at;
    ``timed(model)``, when set, is what is timed instead of the plain model (e.g. a decode step).
    """

    adapter: Adapter
    teacher: nn.Module
    train_loader: Any
    val_loader: Any
    latency_inputs: Any
    evaluate: Callable[[nn.Module, nn.Module, str], dict]
    score_key: str
    save: Callable[[nn.Module, str], None]
    info: dict
    timed: Callable[[nn.Module], Any] | None = None


JobBuilder = Callable[[Recipe, torch.device], Job]

_REGISTRY: dict[str, JobBuilder] = {}

# Imported on the first lookup. They import optional libraries (torchvision, transformers,
# scikit-learn) only inside the functions that use them, so loading them all never needs one:
# an import error here is a fault in HawAda itself and is raised as is.
BUILTIN_JOBS = ("hawada.jobs.vision", "hawada.jobs.text", "hawada.jobs.lm")


def _name(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def register_job(*kinds: str) -> Callable[[JobBuilder], JobBuilder]:
    """Decorator: ``builder(recipe, device) -> Job`` builds the job of each ``data.kind`` in ``kinds``.

    A kind has one builder. Registering a kind that another builder holds raises ValueError
    (and registers none of ``kinds``): the winner would otherwise depend on import order.
    Registering the same builder again (its module imported a second time, e.g. reloaded) is
    allowed and replaces the entry.
    """
    if not kinds:
        raise ValueError("register_job needs at least one data kind")

    def deco(builder: JobBuilder) -> JobBuilder:
        for kind in kinds:
            held = _REGISTRY.get(kind)
            if held is not None and _name(held) != _name(builder):
                raise ValueError(
                    f"data.kind {kind!r} already has a job builder ({_name(held)}); refusing {_name(builder)}"
                )
        for kind in kinds:
            _REGISTRY[kind] = builder
        return builder

    return deco


def job_kinds() -> list[str]:
    """Every ``data.kind`` that has a job, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def job_builder(kind: str) -> JobBuilder:
    """The builder registered for ``kind``; ValueError naming the known kinds if none is."""
    _load_builtin()
    if kind not in _REGISTRY:
        raise ValueError(f"data.kind {kind!r} has no job; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def build_job(recipe: Recipe, device: torch.device) -> Job:
    """The job for the recipe's data kind (each kind lives in its own module)."""
    return job_builder(recipe.data.kind)(recipe, device)


def _load_builtin() -> None:
    for mod in BUILTIN_JOBS:
        importlib.import_module(mod)
