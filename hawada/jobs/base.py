"""The job contract and the registry that picks a job builder from a recipe's ``data.kind``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import Adapter
from hawada.config import Recipe
from hawada.registry import Registry


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


def task_output(adapter: Adapter, model: nn.Module, batch: Any) -> torch.Tensor:
    """What a job scores: ``model.task_output(batch)`` for a model deployed in a runtime (it
    computes the family's output itself, e.g. an ONNX graph), else ``adapter.output(model, batch)``
    (``[B, D]`` pooled embeddings or ``[B, C]`` logits)."""
    own = getattr(model, "task_output", None)
    return own(batch) if callable(own) else adapter.output(model, batch)


# Imported on the first lookup. They import optional libraries (torchvision, transformers,
# scikit-learn) only inside the functions that use them, so loading them all never needs one.
BUILTIN_JOBS = ("hawada.jobs.vision", "hawada.jobs.text", "hawada.jobs.lm")

JOBS: Registry[JobBuilder] = Registry(
    "data.kind",
    BUILTIN_JOBS,
    lambda name, known: ValueError(f"data.kind {name!r} has no job; known: {', '.join(known)}"),
)


def register_job(*kinds: str) -> Callable[[JobBuilder], JobBuilder]:
    """Decorator: ``builder(recipe, device) -> Job`` builds the job of each ``data.kind`` in ``kinds``.

    A kind has one builder: registering a kind another builder holds raises ValueError (and
    registers none of ``kinds``); registering the same builder again replaces the entry.
    """
    if not kinds:
        raise ValueError("register_job needs at least one data kind")

    def deco(builder: JobBuilder) -> JobBuilder:
        JOBS.add(kinds, builder)
        return builder

    return deco


def job_kinds() -> list[str]:
    """Every ``data.kind`` that has a job, sorted."""
    return JOBS.names()


def job_builder(kind: str) -> JobBuilder:
    """The builder registered for ``kind``; ValueError naming the known kinds if none is."""
    return JOBS.get(kind)


def build_job(recipe: Recipe, device: torch.device) -> Job:
    """The job for the recipe's data kind (each kind lives in its own module)."""
    return job_builder(recipe.data.kind)(recipe, device)
