"""Kill-and-resume: a real ``hawada optimize`` subprocess gets a real SIGINT mid gate training,
is resumed, and ends with exactly the gates and weights of an uninterrupted run.

Latency measurements are not reproducible, so the measured numbers (keep-all and minimal
latency, target, proxy table and calibration) and the teacher are stored once in the run's
``state/setup`` and reused by every resume. The uninterrupted reference is the same run
folder copied without its gate checkpoints: resumed, it trains all gate steps in one go on
the same measurements. ``train.probe_every=0`` keeps real-latency probes (which refit the
proxy mid-training) out of the gate phase; probes that do run are stored in each checkpoint.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from hawada.cli import main
from hawada.core.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 14

TINY = {
    "name": "tiny-resume",
    "progress": False,
    "deterministic": True,
    "threads": 1,
    "seed": 3,
    "model": {"family": "resnet", "arch": "resnet18", "num_classes": 10},
    "data": {"kind": "digits", "image_size": 16, "batch_size": 64},
    "teacher": {"epochs": 1, "lr": 0.003},
    "train": {
        "steps": STEPS,
        "lr_gates": 0.2,
        "lambda_lr": 2.0,
        "probe_every": 0,
        "checkpoint_every": 5,
        "lr_weights": 1e-3,
    },
    "target": {"ratio": 0.6, "batch_size": 8},
    "proxy": {"mode": "analytic", "calib_points": 3},
    "search": {"multiples": [1], "modes": ["floor"]},
    "finetune": {"steps": 0, "bn_recalib_batches": 0},
    "measure": {"min_repeats": 3, "max_repeats": 10, "budget_s": 0.1},
    "output": {"plot": False, "keep_state": True},
}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _optimize(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hawada", "optimize", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _gate_records(path) -> list[dict]:
    with open(path) as f:
        recs = [json.loads(x) for x in f.read().splitlines()]
    return [r for r in recs if r["phase"] == "gates"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run stopped by SIGINT after at least 3 gate steps: (tmp folder, output.dir, stderr)."""
    tmp = tmp_path_factory.mktemp("resume")
    recipe = tmp / "tiny.yaml"
    out = tmp / "run"
    recipe.write_text(yaml.safe_dump({**TINY, "output": {**TINY["output"], "dir": str(out)}}))
    proc = _optimize(str(recipe))
    metrics = tmp / "run.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(_gate_records(metrics)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    return tmp, out, err


def test_sigint_writes_a_checkpoint_and_a_one_line_message(interrupted):
    tmp, out, err = interrupted
    last = err.strip().splitlines()[-1]
    assert last.startswith("hawada: SIGINT received: stopped after gate step ")
    assert f"hawada optimize --resume {out}" in last and "Traceback" not in err
    step = int(last.split("gate step ")[1].split(",")[0])
    assert 3 <= step < STEPS
    assert not out.exists()  # outputs appear only when complete
    ptr = json.loads((tmp / "run.partial" / "state" / "checkpoints" / "latest.json").read_text())
    assert ptr["step"] == step and ptr["file"] == f"step-{step:08d}.safetensors"
    # the streamed metrics stop at the checkpointed step
    assert [r["step"] for r in _gate_records(tmp / "run.partial" / "metrics.jsonl")] == list(
        range(1, step + 1)
    )


def test_a_second_start_without_resume_refuses(interrupted, capsys):
    tmp, out, _ = interrupted
    assert main(["optimize", str(tmp / "tiny.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "unfinished run" in err


def test_truncated_checkpoint_is_refused_and_nothing_is_overwritten(interrupted, tmp_path, capsys):
    tmp, _, _ = interrupted
    bad = tmp_path / "bad.partial"
    shutil.copytree(tmp / "run.partial", bad)
    ck = bad / "state" / "checkpoints"
    name = json.loads((ck / "latest.json").read_text())["file"]
    data = (ck / name).read_bytes()
    (ck / name).write_bytes(data[: len(data) // 2])
    before = {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    assert main(["optimize", "--resume", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(ck / name) in err and "truncated or corrupted" in err
    after = {p: p.read_bytes() for p in bad.rglob("*") if p.is_file()}
    assert before == after and not (tmp_path / "bad").exists()
    # a corrupted header (same size) is refused the same way
    (ck / name).write_bytes(b"\xff" * len(data))
    assert main(["optimize", "--resume", str(tmp_path / "bad")]) == 2
    assert "is corrupted" in capsys.readouterr().err


def test_resumed_run_equals_uninterrupted_run_exactly(interrupted):
    tmp, out, _ = interrupted
    # reference: the same run folder (same measurements and teacher) without gate checkpoints
    ref_partial = tmp / "ref.partial"
    shutil.copytree(tmp / "run.partial", ref_partial)
    shutil.rmtree(ref_partial / "state" / "checkpoints")
    os.remove(ref_partial / "metrics.jsonl")
    procs = [_optimize("--resume", str(out)), _optimize("--resume", str(tmp / "ref"))]
    outs = []
    for p in procs:
        o, e = p.communicate(timeout=300)
        assert p.returncode == 0, e[-3000:]
        outs.append(o)
    assert "resuming gate training after step" in outs[0] and "resuming gate training" not in outs[1]
    a_t, a, _ = load_checkpoint(str(out / "state" / "checkpoints"))
    b_t, b, _ = load_checkpoint(str(tmp / "ref" / "state" / "checkpoints"))
    assert a["step"] == b["step"] == STEPS
    students = sorted(k for k in a_t if k.startswith("student."))
    assert "student.hawada_gates.logits" in students
    assert students == sorted(k for k in b_t if k.startswith("student."))
    for k in students + ["lam"]:
        assert torch.equal(a_t[k], b_t[k]), k
    assert float(a_t["lam"]) > 0  # the latency constraint was active
    for k in a_t:
        if k.startswith("opt_"):
            assert torch.equal(a_t[k], b_t[k]), k
    ra, rb = _gate_records(out / "metrics.jsonl"), _gate_records(tmp / "ref" / "metrics.jsonl")
    assert [r["step"] for r in ra] == list(range(1, STEPS + 1))
    assert ra == rb  # every loss, lambda and proxy value of every step, exactly
    # one search candidate and no fine-tuning: the exported models are the same bytes too
    assert (out / "slim" / "model.safetensors").read_bytes() == (
        tmp / "ref" / "slim" / "model.safetensors"
    ).read_bytes()


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    """SIGTERM (what a scheduler sends before preempting) is handled like SIGINT: exit 143."""
    recipe = tmp_path / "tiny.yaml"
    out = tmp_path / "run"
    recipe.write_text(yaml.safe_dump({**TINY, "output": {**TINY["output"], "dir": str(out)}}))
    proc = _optimize(str(recipe))
    metrics = tmp_path / "run.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(_gate_records(metrics)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be stopped: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("hawada: SIGTERM received: stopped after gate step ") and "Traceback" not in err
    step = int(last.split("gate step ")[1].split(",")[0])
    ptr = json.loads((tmp_path / "run.partial" / "state" / "checkpoints" / "latest.json").read_text())
    assert ptr["step"] == step >= 2 and not out.exists()
