"""A ViT image classifier (hf_encoder) on an image folder, end to end through ``hawada optimize``,
and the one-line refusals of teachers that cannot classify the folder's images."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import yaml
from transformers import ViTForImageClassification

from hawada.adapters.base import adapter_for
from hawada.cli import main
from hawada.config import recipe_from_dict
from hawada.data.vision import DataError
from hawada.jobs.vision import build_vision_job
from hawada.slim_io import load_slim
from tests.helpers import save_tiny_vit, write_image_folder

IMAGES = {"train": {"cat": 4, "dog": 4, "owl": 4}, "val": {"cat": 4, "dog": 4, "owl": 4}}


def vit_recipe(model_path, data_path, out, image_size: int = 16) -> dict:
    """Seconds-long settings: 4 gate steps, 2 fine-tune steps, a 2-trial search, short timings."""
    return {
        "name": "vit-imagefolder",
        "threads": 1,
        "progress": False,
        "model": {"family": "hf_encoder", "arch": "vit", "path": str(model_path)},
        "data": {"kind": "imagefolder", "path": str(data_path), "image_size": image_size, "batch_size": 4},
        # gates start near the open/closed boundary and an L0 penalty closes some within 4 steps, so
        # the slim model is pruned whatever the timings
        "gates": {"group_size": {"head": 1, "ffn": 16}, "init_logit": 0.5, "min_keep": {"head": 1, "ffn": 1}},
        "penalties": {"l0": 2.0},
        "train": {"steps": 4, "lr_gates": 0.2, "lambda_lr": 2.0, "probe_every": 2},
        # an absolute target far above any timing: this test is about the classifier, and a ratio of
        # a few-millisecond model is at the mercy of whatever else the machine runs
        "target": {"ratio": None, "latency_ms": 10000.0, "batch_size": 4},
        "proxy": {"mode": "analytic", "calib_points": 2},
        "search": {"multiples": [1, 2], "modes": ["floor"]},
        "finetune": {"steps": 2, "eval_every": 1, "bn_recalib_batches": 0},
        "measure": {"warmup": 1, "min_repeats": 2, "max_repeats": 4, "budget_s": 0.05},
        "output": {"dir": str(out), "plot": False},
    }


def test_vit_classifier_on_an_image_folder_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    save_tiny_vit(tmp_path / "vit", num_labels=3)
    data = write_image_folder(tmp_path / "images", IMAGES)
    out = tmp_path / "run"
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(yaml.safe_dump(vit_recipe(tmp_path / "vit", data, out)))
    # keep the in-memory slim model the run writes, to compare the saved folder with it
    optimize_module = importlib.import_module("hawada.run.optimize")
    written = {}
    real_write = optimize_module.write_outputs

    def keep_slim(ctx, report, gates, slim, history):
        written["slim"], written["kd_kind"] = slim, ctx.adapter.kd_kind
        return real_write(ctx, report, gates, slim, history)

    monkeypatch.setattr(optimize_module, "write_outputs", keep_slim)
    assert main(["optimize", str(recipe)]) == 0
    assert "top1_agreement" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["family"] == "hf_encoder" and written["kd_kind"] == "logits"  # distilled on logits
    agree = rep["agreement"]
    assert set(agree) == {"teacher_accuracy", "student_accuracy", "top1_agreement", "kl", "examples"}
    assert 0.0 <= agree["top1_agreement"] <= 1.0 and agree["kl"] >= 0.0
    # the report scores the test half of val/, which the fine-tune never chose a checkpoint on
    assert rep["job"]["images"] == {"train": 12, "val": 6, "test": 6}
    assert agree["examples"] == 6
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x["eval"] for x in lines if x["phase"] == "finetune" and "eval" in x]
    assert len(evals) == 3 and all(0.0 <= e <= 1.0 for e in evals)  # steps 0, 1, 2 scored on val
    # the slim folder reloads as the classifier, with the run's head and logits
    back = load_slim(str(out / "slim"))
    slim = written["slim"].eval()
    assert type(back) is ViTForImageClassification and back.classifier.out_features == 3
    assert rep["params"]["slim"] < rep["params"]["base"]  # pruned, and the head kept through it
    assert adapter_for(back).layout(back) == rep["layout"]["slim"]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(x).logits, slim(x).logits)


def test_a_bare_encoder_folder_is_refused_in_one_line(tmp_path, capsys) -> None:
    save_tiny_vit(tmp_path / "vit", classifier=False)
    data = write_image_folder(tmp_path / "images", IMAGES)
    out = tmp_path / "run"
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(yaml.safe_dump(vit_recipe(tmp_path / "vit", data, out)))
    assert main(["optimize", str(recipe)]) == 2
    err = capsys.readouterr().err  # transformers' loading progress may come before the error
    assert err.endswith("\n") and err.count("hawada:") == 1
    last = err.splitlines()[-1]
    assert last.startswith("hawada: error: ") and "a ViTModel gives no class logits" in last
    assert not out.exists()


@pytest.mark.parametrize(
    "labels, image_size, message",
    [
        (5, 16, "the ViTForImageClassification has 5 labels, the data 3 classes"),
        (3, 24, "data.image_size: 16, but the ViTForImageClassification takes 24-pixel images"),
    ],
)
def test_a_classifier_that_does_not_fit_the_data_is_refused(tmp_path, labels, image_size, message) -> None:
    save_tiny_vit(tmp_path / "vit", num_labels=labels, image_size=image_size)
    data = write_image_folder(tmp_path / "images", IMAGES)
    recipe = recipe_from_dict(vit_recipe(tmp_path / "vit", data, tmp_path / "run"))
    with pytest.raises(DataError) as e:
        build_vision_job(recipe, torch.device("cpu"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unset_image_size_is_the_one_the_model_folder_declares(tmp_path) -> None:
    save_tiny_vit(tmp_path / "vit", num_labels=3, image_size=24)
    data = write_image_folder(tmp_path / "images", IMAGES)
    spec = vit_recipe(tmp_path / "vit", data, tmp_path / "run")
    del spec["data"]["image_size"]
    job = build_vision_job(recipe_from_dict(spec), torch.device("cpu"))
    assert tuple(job.latency_inputs.shape) == (4, 3, 24, 24)
    images, _ = next(iter(job.train_loader))
    assert tuple(images.shape[-2:]) == (24, 24)
    with torch.no_grad():  # the teacher takes the data's images as they come
        assert job.teacher(pixel_values=images).logits.shape == (images.shape[0], 3)
