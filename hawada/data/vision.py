"""Image-classification data and metrics: scikit-learn's digits and ImageFolder-style folders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hawada.core.loop import to_device
from hawada.errors import InputError


class DataError(InputError):
    """Data that cannot be used as the recipe asks."""


@dataclass
class Splits:
    """Disjoint train / val / test loaders of ``(images [B, 3, S, S], labels [B])``; ``info``
    describes the splits (image counts, where the held-out images came from) for the report."""

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    image_size: int
    info: dict = field(default_factory=dict)


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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Files = list[tuple[str, int]]  # (path relative to the split's folder, with "/", class index)


def class_folders(root: str) -> list[str]:
    """The class names of an ImageFolder-style folder: its sub-folders, sorted (hidden ones skipped)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def image_files(root: str, classes: list[str]) -> Files:
    """Every image under ``root/<class>/`` (sub-folders included) as ``(relative path, class index)``,
    class by class, names sorted, so the list does not depend on the file system's listing order."""
    out: Files = []
    for label, name in enumerate(classes):
        base = os.path.join(root, name)
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, files in os.walk(base, followlinks=True):
            dirnames.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, f), root)
                    out.append((rel.replace(os.sep, "/"), label))
    return out


def _file_key(rel: str) -> str:
    return hashlib.sha256(rel.encode("utf-8")).hexdigest()


def split_held_out(files: Files) -> tuple[Files, Files]:
    """Split one held-out folder's images into disjoint ``(val, test)``, deterministically.

    Within each class the images are ordered by the SHA-256 of their relative path (no random
    state, no file-system order) and the first half goes to val, the rest to test, so a class
    with two or more images is in both. A class with an odd count gives its extra image to val
    and test in turn, so the two stay within one image per odd class of each other.
    """
    by_class: dict[int, list[str]] = {}
    for rel, label in files:
        by_class.setdefault(label, []).append(rel)
    val: Files = []
    test: Files = []
    extra_to_val = True
    for label in sorted(by_class):
        rels = sorted(by_class[label], key=_file_key)
        k = len(rels) // 2
        if len(rels) % 2:
            k += int(extra_to_val)
            extra_to_val = not extra_to_val
        val += [(r, label) for r in sorted(rels[:k])]
        test += [(r, label) for r in sorted(rels[k:])]
    return val, test


class ImageFiles(Dataset):
    """``(image [3, S, S] after ``transform``, class index)`` for each ``(relative path, label)``
    of ``files`` under ``root``; images are read as RGB."""

    def __init__(self, root: str, files: Files, transform: Callable, classes: list[str]) -> None:
        self.root, self.files, self.transform, self.classes = root, list(files), transform, classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        rel, label = self.files[i]
        return self.transform(default_loader(os.path.join(self.root, rel))), label


def _held_out_files(folder: str, classes: list[str]) -> Files:
    """The images of a val/test folder, labelled by the train folder's classes (a class missing
    here is allowed; one train does not have is refused: its label would mean nothing)."""
    extra = sorted(set(class_folders(folder)) - set(classes))
    if extra:
        raise DataError(f"data.path: {folder} has class folders that train/ lacks: {', '.join(extra[:5])}")
    return image_files(folder, classes)


def imagefolder_splits(path: str, image_size: int, batch_size: int, num_workers: int = 0) -> Splits:
    """Train, val and test loaders over ``path/train/<class>/*`` and held-out images, disjoint.

    Val (the fine-tune keeps its best checkpoint on it) and test (the report scores it) never
    share an image: with a ``path/test`` folder they are ``path/val`` and ``path/test``;
    without one, ``path/val`` is split by file with :func:`split_held_out`. Labels are the
    indices of the train folder's sorted class names in every split. ``Splits.info`` gives the
    image counts and where test came from.
    """
    from torchvision import transforms

    if not os.path.isdir(path):
        raise DataError(f"data.path: dataset folder not found: {path}")
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise DataError(f"data.path: expected a '{sub}' folder inside {path}")
    train_dir, val_dir, test_dir = (os.path.join(path, s) for s in ("train", "val", "test"))
    classes = class_folders(train_dir)
    train_files = image_files(train_dir, classes)
    if not train_files:
        raise DataError(f"data.path: no images under {train_dir}")
    if len(train_files) < batch_size:  # training batches are full: not one would be drawn
        raise DataError(
            f"data.batch_size: {batch_size} is more than the {len(train_files)} images under {train_dir}"
        )
    if os.path.isdir(test_dir):
        val_files, test_files = _held_out_files(val_dir, classes), _held_out_files(test_dir, classes)
        source = {"val": "val/", "test": "test/"}
        for name, files, folder in (("val", val_files, val_dir), ("test", test_files, test_dir)):
            if not files:
                raise DataError(f"data.path: no images under {folder} (the {name} split)")
        val_root, test_root = val_dir, test_dir
    else:
        held = _held_out_files(val_dir, classes)
        val_files, test_files = split_held_out(held)
        if not val_files or not test_files:
            raise DataError(
                f"data.path: {val_dir} has {len(held)} image(s): too few to split into val and test "
                "(add images, or a test/ folder)"
            )
        source = {"val": "val/, half of each class by file hash", "test": "val/, the other half"}
        val_root = test_root = val_dir
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

    def mk(root: str, files: Files, transform: Callable, sh: bool) -> DataLoader:
        return DataLoader(
            ImageFiles(root, files, transform, classes),
            batch_size=batch_size,
            shuffle=sh,
            drop_last=sh,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    info = {
        "images": {"train": len(train_files), "val": len(val_files), "test": len(test_files)},
        "held_out": source,
    }
    return Splits(
        mk(train_dir, train_files, t_train, True),
        mk(val_root, val_files, t_eval, False),
        mk(test_root, test_files, t_eval, False),
        len(classes),
        image_size,
        info,
    )


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


def class_logits(out: Any) -> torch.Tensor:
    """``[B, C]`` class logits from a model's output: a plain tensor as it is, a transformers
    output object (``ImageClassifierOutput``, ``SequenceClassifierOutput``) by its ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise DataError(
        f"the model's output ({type(out).__name__}) has no class logits: classification metrics need a classifier"
    )


@torch.no_grad()
def classification_metrics(
    teacher: nn.Module, student: nn.Module, loader: Iterable, device: torch.device
) -> dict:
    """Accuracy of both, student/teacher top-1 agreement and mean KL(teacher || student) over
    ``loader``'s ``(images [B, 3, S, S], labels [B])``; either model may return a ``[B, C]``
    tensor or a transformers output with ``logits``."""
    teacher.eval()
    student.eval()
    n = acc_t = acc_s = agree = 0
    kl = 0.0
    for x, y in loader:
        x, y = to_device((x, y), device)
        lt, ls = class_logits(teacher(x)).float(), class_logits(student(x)).float()
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
