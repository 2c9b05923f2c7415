"""Image classification jobs (digits, ImageFolder) for CNN and ViT-style classifier families."""

from __future__ import annotations

import os

import torch
from torch import nn

from hawada.adapters.base import Adapter, get_adapter
from hawada.config import Recipe
from hawada.data.vision import (
    DataError,
    Splits,
    classification_metrics,
    digits_splits,
    imagefolder_splits,
    train_classifier,
)
from hawada.hf_remote.folder import read_config_json
from hawada.jobs.base import Job, register_job

IMAGE_FAMILIES = ("resnet", "hf_encoder")  # the families whose models classify images


def check_classifier(teacher: nn.Module, adapter: Adapter, splits: Splits) -> None:
    """Refuse, in one line, a teacher that cannot classify these images: one that gives no class
    logits (a bare encoder), whose label count differs from the data's classes, or whose config
    fixes another input size. The run would otherwise fail after training, or score labels that
    mean nothing."""
    name = type(teacher).__name__
    if adapter.kd_kind != "logits":
        raise DataError(
            f"model.path: a {name} gives no class logits; image classification needs a classifier "
            "(config.architectures naming a *ForImageClassification class)"
        )
    cfg = getattr(teacher, "config", None)
    if cfg is None:  # torchvision models are built for the data's class count
        return
    labels = getattr(cfg, "num_labels", None)
    if labels is not None and labels != splits.num_classes:
        raise DataError(f"model.path: the {name} has {labels} labels, the data {splits.num_classes} classes")
    size = getattr(cfg, "image_size", None)
    want = splits.image_size
    if size is not None and size not in (want, [want, want], (want, want)):
        raise DataError(f"data.image_size: {want}, but the {name} takes {size}-pixel images")


DEFAULT_IMAGE_SIZE = 32  # data.image_size when neither the recipe nor the model folder gives one


def declared_image_size(path: str | None) -> int | None:
    """The square image size a transformers model folder's config.json declares (ViT: ``image_size``),
    or None (no folder, a torchvision weights file, no such field, a non-square size)."""
    if path is None or not os.path.isdir(path):
        return None
    cfg = read_config_json(path) or {}
    size = cfg.get("image_size")
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return int(size) if isinstance(size, int) else None


@register_job("digits", "imagefolder")
def build_vision_job(recipe: Recipe, device: torch.device) -> Job:
    d, m = recipe.data, recipe.model
    adapter = get_adapter(m.family)  # an unknown family is named first
    if m.family not in IMAGE_FAMILIES:  # e.g. a decoder recipe that left data.kind at its default
        raise DataError(
            f"data.kind: {d.kind} is image data, which the {m.family} family does not take "
            f"(image families: {', '.join(IMAGE_FAMILIES)}; text: data.kind text, stdlib_docstrings or stdlib_source)"
        )
    if m.path is not None and not os.path.exists(m.path):
        raise DataError(f"model.path: file not found: {m.path}")
    size = d.image_size if d.image_size is not None else declared_image_size(m.path) or DEFAULT_IMAGE_SIZE
    if d.kind == "digits":
        splits = digits_splits(size, d.batch_size, d.val_fraction, recipe.seed)
    else:
        splits = imagefolder_splits(d.path or "", size, d.batch_size, d.num_workers)
    teacher: nn.Module = adapter.load_model(m.arch, splits.num_classes, m.path)
    check_classifier(teacher, adapter, splits)
    info = {
        "data": d.kind,
        "train_batches": len(splits.train),
        "num_classes": splits.num_classes,
        **splits.info,
    }
    if m.path is None:
        losses = train_classifier(
            teacher, splits.train, recipe.teacher.epochs, recipe.teacher.lr, device, recipe.progress
        )
        info["teacher_train_loss"] = losses
    teacher.to(device).eval()
    lat_in = torch.randn(recipe.target.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))

    def evaluate(t: nn.Module, s: nn.Module, split: str) -> dict:
        return classification_metrics(t, s, splits.val if split == "val" else splits.test, device)

    return Job(
        adapter, teacher, splits.train, splits.val, lat_in, evaluate, "top1_agreement", adapter.save, info
    )
