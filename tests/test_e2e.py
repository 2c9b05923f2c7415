"""The whole job on a tiny recipe: attach -> calibrate -> train -> search -> export -> fine-tune -> report."""

import json
import os

import torch
import yaml

from hawada.cli import main
from hawada.slim_io import load_slim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "name": "tiny",
    "progress": False,
    "model": {"family": "resnet", "arch": "resnet18", "num_classes": 10},
    "data": {"kind": "digits", "image_size": 16, "batch_size": 32},
    "teacher": {"epochs": 1, "lr": 0.003},
    "train": {"steps": 6, "lr_gates": 0.2, "lambda_lr": 2.0, "probe_every": 3},
    "target": {"ratio": 0.6, "batch_size": 16},
    "proxy": {"mode": "analytic", "calib_points": 3},
    "search": {"multiples": [1, 8], "modes": ["floor", "ceil"]},
    "finetune": {"steps": 4, "eval_every": 2, "bn_recalib_batches": 2},
    "measure": {"min_repeats": 3, "max_repeats": 20, "budget_s": 0.3},
}


def test_tiny_recipe_end_to_end(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["optimize", str(recipe), "--set", f"output.dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "slim latency" in printed
    assert sorted(os.listdir(out)) == ["metrics.jsonl", "report.json", "report.png", "slim", "tensorboard"]
    rep = json.loads((out / "report.json").read_text())
    lat = rep["latency"]
    for side in ("base", "slim"):
        assert lat[side]["device"] == "cpu" and lat[side]["shapes"] == [[16, 3, 16, 16]]
        assert lat[side]["median_ms"] > 0 and lat[side]["n"] >= 3
    assert abs(lat["speedup"] - lat["base"]["median_ms"] / lat["slim"]["median_ms"]) < 1e-9
    assert len(rep["search"]["trials"]) == 4
    # a ratio target: gate training aims at the first start's keep-all; the search judges each
    # export against keep-all timed right before it, and the report gives the chosen one's
    assert abs(lat["train_target_ms"] - 0.6 * lat["setup_base_ms"]) < 1e-9
    assert abs(lat["target_ms"] - 0.6 * lat["search_base_ms"]) < 1e-9
    for t in rep["search"]["trials"]:  # each export against keep-all timed right before it
        assert abs(t["limit_ms"] - 0.6 * t["reference_ms"]) < 1e-9
        assert t["within_target"] == (t["median_ms"] <= t["limit_ms"])
    gates = [
        x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if x["phase"] == "gates"
    ]
    assert gates[-1]["target_ms"] == lat["train_target_ms"]
    assert 0 <= rep["agreement"]["top1_agreement"] <= 1 and rep["agreement"]["examples"] > 0
    assert rep["params"]["slim"] <= rep["params"]["base"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gates = [x for x in lines if x["phase"] == "gates"]
    assert len(gates) == 6 and [x["step"] for x in gates if "real_ms" in x] == [3, 6]
    slim = load_slim(str(out / "slim"))
    assert slim.fc.in_features == rep["layout"]["slim"]["layers"][3][-1]["out"]
    y = slim(torch.randn(2, 3, 16, 16))
    assert y.shape == (2, 10)
    # the saved model is the reported one: same parameter count
    assert sum(p.numel() for p in slim.parameters()) == rep["params"]["slim"]
    # `hawada eval` measures the saved model
    assert main(["eval", str(out / "slim"), "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["median_ms"] > 0


def test_profile_fidelity_reports_both_proxy_modes(tmp_path, capsys):
    out = tmp_path / "fid.json"
    code = main(
        [
            "profile",
            os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"),
            "--fidelity",
            "--points",
            "4",
            "--set",
            "data.image_size=16",
            "--set",
            "target.batch_size=2",
            "--set",
            "proxy.calib_points=3",
            "--set",
            "measure.min_repeats=3",
            "--set",
            "measure.budget_s=0.1",
            "--set",
            "proxy.lut_repeats=1",
            "--set",
            "proxy.lut_budget_s=0.01",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    fid = json.loads(out.read_text())["fidelity"]
    assert set(fid["modes"]) == {"analytic", "lut"} and len(fid["measured_ms"]) == 4
    for m in fid["modes"].values():
        assert m["mape_pct"] >= 0 and -1 <= m["spearman"] <= 1 and len(m["predicted_ms"]) == 4
    assert fid["modes"]["lut"]["ops_timed"] > 0
