"""The whole job on a tiny recipe: attach -> calibrate -> train -> search -> export -> fine-tune -> report."""

import json
import math
import os

import pytest
import torch
import yaml

import hawada
from hawada.adapters.base import get_adapter
from hawada.cli import main
from hawada.config import recipe_from_dict
from hawada.core.checkpoint import load_checkpoint
from hawada.core.proxy_cost import mape, spearman
from hawada.jobs import build_job
from hawada.run.fidelity import proxy_fidelity
from hawada.slim_io import load_slim
from tests.helpers import latency_result, rerandomized, tiny_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RATIO = 0.25  # the tiny recipe prunes hard: the slim model has a small fraction of the work

TINY = {
    "name": "tiny",
    "progress": False,
    "threads": 1,
    "model": {"family": "resnet", "arch": "resnet18", "num_classes": 10},
    "data": {"kind": "digits", "image_size": 16, "batch_size": 32},
    "teacher": {"epochs": 1, "lr": 0.003},
    "gates": {"init_logit": 1.0},
    "train": {"steps": 6, "lr_gates": 0.5, "lambda_lr": 5.0, "probe_every": 3},
    "target": {"ratio": RATIO, "batch_size": 16},
    "proxy": {"mode": "analytic", "calib_points": 3},
    "search": {"multiples": [1, 8], "modes": ["floor", "ceil"]},
    "finetune": {"steps": 60, "eval_every": 30, "bn_recalib_batches": 2},
    "measure": {"min_repeats": 3, "max_repeats": 20, "budget_s": 0.3},
    "output": {"keep_state": True},
}


@pytest.fixture
def restore_threads():
    """The recipe sets torch's thread count for the process: give the next tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tiny_recipe_end_to_end(tmp_path, capsys, restore_threads):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["optimize", str(recipe), "--set", f"output.dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "slim latency" in printed
    assert sorted(os.listdir(out)) == [
        "metrics.jsonl",
        "report.json",
        "report.png",
        "slim",
        "state",
        "tensorboard",
    ]
    rep = json.loads((out / "report.json").read_text())
    lat = rep["latency"]
    for side in ("base", "slim"):
        assert lat[side]["device"] == "cpu" and lat[side]["shapes"] == [[16, 3, 16, 16]]
        assert lat[side]["median_ms"] > 0 and lat[side]["n"] >= 3
    assert abs(lat["speedup"] - lat["base"]["median_ms"] / lat["slim"]["median_ms"]) < 1e-9
    assert len(rep["search"]["trials"]) == 4
    # a ratio target: gate training aims at the first start's keep-all; the search judges each
    # export against keep-all timed right before it, and the report gives the chosen one's
    assert abs(lat["train_target_ms"] - RATIO * lat["setup_base_ms"]) < 1e-9
    assert abs(lat["target_ms"] - RATIO * lat["search_base_ms"]) < 1e-9
    for t in rep["search"]["trials"]:  # each export against keep-all timed right before it
        assert abs(t["limit_ms"] - RATIO * t["reference_ms"]) < 1e-9
        assert t["within_target"] == (t["median_ms"] <= t["limit_ms"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gates = [x for x in lines if x["phase"] == "gates"]
    assert gates[-1]["target_ms"] == lat["train_target_ms"]
    assert len(gates) == 6 and [x["step"] for x in gates if "real_ms" in x] == [3, 6]
    # pruned hard: a fraction of the parameters, and faster than keep-all timed interleaved with
    # it (the target is 0.25 x keep-all; 1.5x leaves a wide margin for a noisy machine)
    assert rep["params"]["slim"] < 0.3 * rep["params"]["base"]
    assert lat["speedup"] > 1.5
    slim = load_slim(str(out / "slim"))
    assert slim.fc.in_features == rep["layout"]["slim"]["layers"][3][-1]["out"]
    assert sum(p.numel() for p in slim.parameters()) == rep["params"]["slim"]
    # the saved model is the one the report scored: on the test split, against the run's teacher
    # (kept in state/), it gives the same predictions and the same KL as the in-memory model did
    r = recipe_from_dict({**TINY, "teacher": {"epochs": 0}})
    job = build_job(r, torch.device("cpu"))
    tensors, _, _ = load_checkpoint(str(out / "state" / "setup"))
    job.teacher.load_state_dict(
        {k[len("teacher.") :]: v for k, v in tensors.items() if k.startswith("teacher.")}
    )
    agreement = rep["agreement"]
    again = job.evaluate(job.teacher, slim, "test")
    assert again["examples"] == agreement["examples"] > 0
    for k in ("teacher_accuracy", "student_accuracy", "top1_agreement"):
        assert again[k] == agreement[k], k
    assert again["kl"] == pytest.approx(agreement["kl"], rel=1e-4, abs=1e-6)
    # the scale: the teacher against itself agrees exactly; the slim student is far above its own
    # architecture with the weights redrawn at random (chance, for ten classes)
    assert job.evaluate(job.teacher, job.teacher, "test")["top1_agreement"] == 1.0
    chance = job.evaluate(job.teacher, rerandomized(slim), "test")["top1_agreement"]
    assert agreement["teacher_accuracy"] > 0.6
    assert agreement["top1_agreement"] > 0.35 and chance < 0.25
    # `hawada eval` measures the saved model
    assert main(["eval", str(out / "slim"), "--batch-size", "4", "--json"]) == 0
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
    assert all(m > 0 for m in fid["measured_ms"])
    for m in fid["modes"].values():
        # the figures are the error of the proxy's predictions against the held-out measurements
        assert len(m["predicted_ms"]) == 4
        assert m["mape_pct"] == pytest.approx(mape(m["predicted_ms"], fid["measured_ms"]))
        assert m["spearman"] == pytest.approx(spearman(m["predicted_ms"], fid["measured_ms"]))
        # (a 16-pixel batch of 2 is per-op overhead: a fit that is one constant may be the right one)
        assert all(p > 0 for p in m["predicted_ms"])
        assert math.isfinite(m["keep_all_error_pct"]) and fid["keep_all_ms"] > 0
    assert fid["modes"]["lut"]["ops_timed"] > 0


class FlopsMeter:
    """A device whose latency is a known law of the work done: 0.5 ms + 2 ms per GFLOP (conv,
    linear and batch-norm FLOPs counted as the resnet adapter's cost terms count them), or with
    ``sign=-1`` a law no latency proxy may fit (0.05 ms / GFLOP: faster the more work is done)."""

    def __init__(self, inputs: torch.Tensor, sign: float = 1.0) -> None:
        self.inputs, self.sign = inputs, sign

    def __call__(self, model: torch.nn.Module):
        flops = 0.0

        def count(mod, args, out):
            nonlocal flops
            if isinstance(mod, torch.nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1]
                flops += 2.0 * out.numel() * (mod.in_channels // mod.groups) * k
            elif isinstance(mod, torch.nn.Linear):
                flops += 2.0 * args[0].shape[0] * mod.in_features * mod.out_features
            elif isinstance(mod, torch.nn.BatchNorm2d):
                flops += 4.0 * out.numel()

        hooks = [m.register_forward_hook(count) for m in model.modules()]
        try:
            with torch.no_grad():
                model.eval()(self.inputs)
        finally:
            for h in hooks:
                h.remove()
        gflops = flops / 1e9
        return latency_result(0.5 + 2.0 * gflops if self.sign > 0 else 0.05 / gflops)


def test_fidelity_is_the_proxy_error_on_held_out_sub_architectures():
    """On a device with a known latency law, the analytic proxy calibrated on a few measured
    sub-architectures predicts held-out ones exactly, and fidelity says so; on a law no
    non-negative proxy can follow, fidelity reports the failure."""
    x = torch.randn(2, 3, 16, 16)
    adapter = get_adapter("resnet")
    gated = hawada.attach(tiny_resnet())
    good = proxy_fidelity(
        gated, adapter, x, FlopsMeter(x), "cpu", modes=("analytic",), calib_points=4, points=6
    )
    m = good["modes"]["analytic"]
    assert len(set(good["measured_ms"])) == 6  # six different held-out sub-architectures
    assert m["mape_pct"] < 1e-3 and m["spearman"] == pytest.approx(1.0)
    assert abs(m["keep_all_error_pct"]) < 1e-3 and good["keep_all_ms"] > max(good["measured_ms"])
    bad = proxy_fidelity(
        gated, adapter, x, FlopsMeter(x, sign=-1.0), "cpu", modes=("analytic",), calib_points=3, points=4
    )
    m = bad["modes"]["analytic"]
    assert m["spearman"] <= 0.0 and m["mape_pct"] > 10.0
