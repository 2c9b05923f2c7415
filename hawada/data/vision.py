"""Image-classification data and metrics: scikit-learn's digits and ImageFolder datasets."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hawada.core.train import to_device
from hawada.errors import InputError


class DataError(InputError):
    """Data that cannot be used as the recipe asks."""


@dataclass
class Splits:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    image_size: int


def digits_tensors(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``[1797, 3, S, S]`` normalised images and ``[1797]`` labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return x, torch.tensor(d.target, dtype=torch.long)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_val = n_test = int(round(n * val_fraction / 2)) if val_fraction > 0 else 0
    n_val = max(n_val, 1)
    n_test = max(n_test, 1)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


def digits_splits(image_size: int, batch_size: int, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Deterministic train/val/test loaders over the digits set."""
    x, y = digits_tensors(image_size)
    tr, va, te = _split_indices(len(y), val_fraction, seed)
    g = torch.Generator().manual_seed(seed)

    def mk(idx, shuffle):
        return DataLoader(
            TensorDataset(x[idx], y[idx]),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            generator=g if shuffle else None,
        )

    return Splits(mk(tr, True), mk(va, False), mk(te, False), 10, image_size)


def imagefolder_splits(path: str, image_size: int, batch_size: int, num_workers: int = 0) -> Splits:
    """``path/train`` and ``path/val`` ImageFolders (val doubles as test)."""
    from torchvision import datasets, transforms

    if not os.path.isdir(path):
        raise DataError(f"data.path: dataset folder not found: {path}")
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise DataError(f"data.path: expected a '{sub}' folder inside {path}")
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    t_train = transforms.Compose(
        [
            transforms.RandomResizedCrop(image_size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            norm,
        ]
    )
    t_eval = transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            norm,
        ]
    )
    train: Dataset = datasets.ImageFolder(os.path.join(path, "train"), t_train)
    val: Dataset = datasets.ImageFolder(os.path.join(path, "val"), t_eval)
    if len(train) == 0:
        raise DataError(f"data.path: no images under {os.path.join(path, 'train')}")

    def mk(ds, sh):
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=sh,
            drop_last=sh,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    return Splits(mk(train, True), mk(val, False), mk(val, False), len(train.classes), image_size)


def train_classifier(
    model: nn.Module, loader: Iterable, epochs: int, lr: float, device: torch.device, progress: bool = True
) -> list[float]:
    """Train ``model`` with cross-entropy (AdamW, cosine schedule); returns per-epoch loss."""
    if epochs <= 0:
        return []
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * len(loader)  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="teacher", dynamic_ncols=True)
    losses = []
    for _ in range(epochs):
        s, n = 0.0, 0
        for x, y in loader:
            x, y = to_device((x, y), device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            s, n = s + float(loss.detach()) * len(y), n + len(y)
            if bar is not None:
                bar.update(1)
        losses.append(s / max(n, 1))
    if bar is not None:
        bar.close()
    model.eval()
    return losses


@torch.no_grad()
def classification_metrics(
    teacher: nn.Module, student: nn.Module, loader: Iterable, device: torch.device
) -> dict:
    """Accuracy of both, student/teacher top-1 agreement and mean KL(teacher || student)."""
    teacher.eval()
    student.eval()
    n = acc_t = acc_s = agree = 0
    kl = 0.0
    for x, y in loader:
        x, y = to_device((x, y), device)
        lt, ls = teacher(x), student(x)
        acc_t += int((lt.argmax(-1) == y).sum())
        acc_s += int((ls.argmax(-1) == y).sum())
        agree += int((lt.argmax(-1) == ls.argmax(-1)).sum())
        kl += float(F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="sum"))
        n += len(y)
    if n == 0:
        raise DataError("evaluation split is empty")
    return {
        "teacher_accuracy": acc_t / n,
        "student_accuracy": acc_s / n,
        "top1_agreement": agree / n,
        "kl": kl / n,
        "examples": n,
    }
