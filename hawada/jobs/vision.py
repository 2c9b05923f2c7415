"""Image classification jobs (digits, ImageFolder) for CNN families."""

from __future__ import annotations

import os

import torch
from torch import nn

from hawada.adapters.base import get_adapter
from hawada.config import Recipe
from hawada.data.vision import (
    DataError,
    classification_metrics,
    digits_splits,
    imagefolder_splits,
    train_classifier,
)
from hawada.jobs.base import Job, register_job


@register_job("digits", "imagefolder")
def build_vision_job(recipe: Recipe, device: torch.device) -> Job:
    d, m = recipe.data, recipe.model
    if d.kind == "digits":
        splits = digits_splits(d.image_size, d.batch_size, d.val_fraction, recipe.seed)
    else:
        splits = imagefolder_splits(d.path or "", d.image_size, d.batch_size, d.num_workers)
    adapter = get_adapter(m.family)
    if m.path is not None and not os.path.exists(m.path):
        raise DataError(f"model.path: file not found: {m.path}")
    teacher: nn.Module = adapter.load_model(m.arch, splits.num_classes, m.path)
    info = {"data": d.kind, "train_batches": len(splits.train), "num_classes": splits.num_classes}
    if m.path is None:
        losses = train_classifier(
            teacher, splits.train, recipe.teacher.epochs, recipe.teacher.lr, device, recipe.progress
        )
        info["teacher_train_loss"] = losses
    teacher.to(device).eval()
    lat_in = torch.randn(
        recipe.target.batch_size, 3, d.image_size, d.image_size, generator=torch.Generator().manual_seed(0)
    )

    def evaluate(t: nn.Module, s: nn.Module, split: str) -> dict:
        return classification_metrics(t, s, splits.val if split == "val" else splits.test, device)

    return Job(
        adapter, teacher, splits.train, splits.val, lat_in, evaluate, "top1_agreement", adapter.save, info
    )
