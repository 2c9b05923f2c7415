"""Image folders (disjoint val and test, by separate folders or a deterministic split by file) and
classification metrics on plain tensors and transformers outputs."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from hawada.data.vision import (
    DataError,
    class_folders,
    classification_metrics,
    image_files,
    imagefolder_splits,
    split_held_out,
)
from tests.helpers import write_image_folder

HELD_OUT = {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 5, "b": 4, "c": 1}}


def files_of(loader) -> list[tuple[str, int]]:
    return loader.dataset.files


def test_held_out_folder_is_split_into_disjoint_val_and_test(tmp_path) -> None:
    root = write_image_folder(tmp_path / "data", HELD_OUT)
    s = imagefolder_splits(str(root), 16, 2)
    val, test = files_of(s.val), files_of(s.test)
    val_dir = str(root / "val")
    assert s.val.dataset.root == s.test.dataset.root == val_dir
    assert not set(val) & set(test)
    assert sorted(val + test) == image_files(val_dir, class_folders(str(root / "train")))  # nothing lost
    per_val, per_test = Counter(lab for _, lab in val), Counter(lab for _, lab in test)
    # classes with two or more images are in both; odd counts give their extra image in turn
    assert per_val == {0: 3, 1: 2} and per_test == {0: 2, 1: 2, 2: 1}
    assert s.info == {
        "images": {"train": 6, "val": 5, "test": 5},
        "held_out": {"val": "val/, half of each class by file hash", "test": "val/, the other half"},
    }
    assert s.num_classes == 3
    # the loaders give the listed images, labelled by class, at the recipe's size
    xs, ys = zip(*list(s.test))
    assert torch.cat(ys).tolist() == [lab for _, lab in test]
    assert all(x.shape[1:] == (3, 16, 16) for x in xs)


def test_split_is_the_same_on_every_call_and_whatever_the_file_system_order(tmp_path) -> None:
    a = write_image_folder(tmp_path / "a", HELD_OUT)
    b = write_image_folder(tmp_path / "b", HELD_OUT, order=lambda n: reversed(range(n)))
    first = imagefolder_splits(str(a), 16, 2)
    again = imagefolder_splits(str(a), 16, 2)
    other = imagefolder_splits(str(b), 16, 2)
    for s in (again, other):
        assert files_of(s.val) == files_of(first.val)
        assert files_of(s.test) == files_of(first.test)


def test_split_depends_on_the_file_not_its_position() -> None:
    files = [(f"a/img{i}.png", 0) for i in range(10)]
    val, test = split_held_out(files)
    assert len(val) == len(test) == 5
    # one more image in the class moves at most one other between the halves
    val2, test2 = split_held_out([*files, ("a/img10.png", 0)])
    assert len(set(val) & set(val2)) >= 4 and len(set(test) & set(test2)) >= 4
    assert val != files[:5]  # ordered by hash, not by name


def test_separate_val_and_test_folders_are_used_as_they_are(tmp_path) -> None:
    root = write_image_folder(
        tmp_path / "data",
        {"train": {"a": 2, "b": 2, "c": 2}, "val": {"a": 2, "b": 1}, "test": {"c": 3}},
    )
    s = imagefolder_splits(str(root), 16, 2)
    assert s.val.dataset.root == str(root / "val") and s.test.dataset.root == str(root / "test")
    assert files_of(s.val) == [("a/img0.png", 0), ("a/img1.png", 0), ("b/img0.png", 1)]
    # labels follow train's classes even where a split lacks some: c is class 2 everywhere
    assert files_of(s.test) == [("c/img0.png", 2), ("c/img1.png", 2), ("c/img2.png", 2)]
    assert s.info["held_out"] == {"val": "val/", "test": "test/"}
    assert s.info["images"] == {"train": 6, "val": 3, "test": 3}


@pytest.mark.parametrize(
    "layout, batch, message",
    [
        ({"train": {"a": 2}, "val": {"a": 1}}, 2, "has 1 image(s): too few to split into val and test"),
        ({"train": {"a": 2}, "val": {"a": 2}, "test": {}}, 2, "(the test split)"),
        ({"train": {"a": 2}, "val": {"a": 2, "z": 2}}, 2, "has class folders that train/ lacks: z"),
        ({"train": {"a": 2}, "val": {"a": 2}}, 3, "data.batch_size: 3 is more than the 2 images"),
        ({"train": {}, "val": {"a": 2}}, 2, "no images under"),
    ],
)
def test_unusable_folders_are_one_line_errors(tmp_path, layout, batch, message) -> None:
    root = write_image_folder(tmp_path / "data", layout)
    for split in layout:  # a split given with no classes is an empty folder
        (root / split).mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError) as e:
        imagefolder_splits(str(root), 16, batch)
    assert message in str(e.value) and "\n" not in str(e.value)


class Logits(nn.Module):
    """A transformers classifier seen as a plain ``[B, C]`` tensor model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def tiny_vit(seed: int, cls=ViTForImageClassification) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=8,
        patch_size=4,
        num_labels=4,
    )
    return cls(cfg).eval()


def test_classification_metrics_take_transformers_outputs_and_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 4, (10,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    teacher, student = tiny_vit(0), tiny_vit(1)
    cpu = torch.device("cpu")
    hf = classification_metrics(teacher, student, loader, cpu)
    plain = classification_metrics(Logits(teacher), Logits(student), loader, cpu)
    assert hf == plain
    with torch.no_grad():
        lt, ls = teacher(x).logits, student(x).logits
    assert hf["examples"] == 10
    assert hf["top1_agreement"] == pytest.approx((lt.argmax(-1) == ls.argmax(-1)).float().mean().item())
    assert hf["teacher_accuracy"] == pytest.approx((lt.argmax(-1) == y).float().mean().item())
    kl = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(lt, -1), log_target=True, reduction="batchmean")
    assert hf["kl"] == pytest.approx(float(kl), rel=1e-5)
    same = classification_metrics(teacher, teacher, loader, cpu)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)


def test_classification_metrics_refuse_a_model_without_logits() -> None:
    loader = DataLoader(
        TensorDataset(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)), batch_size=2
    )
    bare = tiny_vit(0, ViTModel)
    with pytest.raises(DataError, match="has no class logits"):
        classification_metrics(bare, bare, loader, torch.device("cpu"))
