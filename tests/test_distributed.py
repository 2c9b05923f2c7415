"""Data-parallel gate training: sharding, collectives, and a real 2-rank gloo job.

The multi-process tests launch ``torchrun`` (2 CPU processes, gloo) as a real subprocess; the
end-to-end test runs ``hawada optimize`` on a tiny LLaMA once with 2 ranks and once as a single
process with the same global batch, and compares the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from hawada.core.checkpoint import load_checkpoint
from hawada.core.distributed import DistEnv, ShardedBatches, ShardError, shard_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_shard_batch_splits_every_tensor_and_refuses_uneven_batches():
    batch = {"input_ids": torch.arange(12).view(6, 2), "attention_mask": torch.ones(6, 2), "n": 3}
    parts = [shard_batch(batch, DistEnv(rank=r, world=3)) for r in range(3)]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert parts[1]["input_ids"].tolist() == [[4, 5], [6, 7]] and parts[2]["n"] == 3
    assert shard_batch(batch, DistEnv()) is batch
    with pytest.raises(ShardError, match="global batch of 6 rows cannot be split evenly across 4 ranks"):
        shard_batch(batch, DistEnv(rank=0, world=4))
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=5)
    with pytest.raises(ShardError, match="global batch of 5 rows"):
        ShardedBatches(loader, DistEnv(rank=0, world=2))


def test_sharded_dataloader_loads_only_the_rank_rows():
    seen: list[int] = []

    class Recording(TensorDataset):
        def __getitem__(self, i):
            seen.append(int(i))
            return super().__getitem__(i)

    ds = Recording(torch.arange(16))
    sharded = ShardedBatches(DataLoader(ds, batch_size=8), DistEnv(rank=1, world=2))
    got = [b[0].tolist() for b in sharded]
    assert got == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert sorted(seen) == [4, 5, 6, 7, 12, 13, 14, 15]  # rank 0's rows were never read
    assert len(sharded) == 2


def _rank_results(out) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_collectives_on_two_gloo_ranks(tmp_path):
    p = torchrun("tests/dist_worker.py", "collectives", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    r0, r1 = _rank_results(tmp_path)
    for r in (r0, r1):
        assert r["world"] == 2 and r["backend"] == "gloo"
        assert r["broadcast"] == {"from": 0}
        assert r["any_rank_1"] is True and r["any_none"] is False
        # an error on rank 0 reaches every rank with its type and message: nobody hangs
        assert r["on_main_error"] == "target latency 1 ms is below the fastest allowed keep set"
        assert r["on_main_value"] == 41
        assert r["main_only_exit"] == 3  # a SystemExit on rank 0 ends every rank with its code
        assert r["unpicklable"].startswith("rank 0's result cannot be sent to the other ranks")
        assert r["identical_ok"] is True
        assert r["mismatch"].startswith("gate logits differs between the 2 ranks after step 3")
        assert r["loader_shards_cover_global_batches"] is True
    # a BaseException on rank 0 reaches rank 1 too; rank 0 re-raises its own object
    assert r0["on_main_base"] == ["KeyboardInterrupt", "stopped on rank 0", True]
    assert r1["on_main_base"] == ["KeyboardInterrupt", "stopped on rank 0", False]
    assert r0["odd_error"] == ["TwoArgError", "table failed 3 times"]
    assert r1["odd_error"] == ["RuntimeError", "TwoArgError: table failed 3 times"]
    assert r0["main_only_value"] == "lock" and r1["main_only_value"] is None


def test_a_bad_batch_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    p = torchrun("tests/dist_worker.py", "trainer_nan", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    r0, r1 = _rank_results(tmp_path)
    assert r0["skipped"] == r1["skipped"] == [2, 4]
    assert r0["bad_total"] == r1["bad_total"] == 2
    assert r0["replica_checks"] == r1["replica_checks"] == 4
    assert r0["logits"] == r1["logits"] and r0["lambda"] == r1["lambda"] > 0


def test_sharded_student_state_restores_exactly(tmp_path):
    """FSDP2: a checkpoint of a sharded student holds whole tensors, and a second sharded
    trainer loaded from it (weights, gates, optimizer states re-sharded) continues exactly."""
    p = torchrun("tests/dist_worker.py", "fsdp_resume", str(tmp_path))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    for r in _rank_results(tmp_path):
        # 2 layers x (query slots + KV groups + FFN groups) = 20 width gates, and 2 layer gates
        assert r["sharded"] is True and r["whole_logits_in_state"] == [22]
        assert r["equal"] is True
        assert r["lambda"][0] == r["lambda"][1] > 0
        assert r["replica_checks"] == 3


STEPS, FT_STEPS = 6, 2


def _recipe(model: str, out: str) -> dict:
    return {
        "name": "lm-ddp",
        "progress": False,
        "threads": 1,
        "seed": 5,
        "deterministic": True,
        "model": {"family": "hf_decoder", "arch": "llama", "path": model},
        "data": {"kind": "stdlib_source", "seq_len": 16, "batch_size": 4, "max_chars": 20000},
        # the L0 term closes every gate it may: min_keep holds a head, a KV group and every layer
        "gates": {
            "group_size": {"ffn": 16},
            "min_keep": {"head": 1, "kv_group": 1, "layer": 1},
            "init_logit": 0.5,
        },
        # unweighted L0: cost weights come from the measured (run-dependent) proxy
        "penalties": {"l0": 0.5, "cost_weighted": False},
        "train": {
            "steps": STEPS,
            "probe_every": 0,
            "lr_gates": 0.2,
            "lr_weights": 1e-3,
            "checkpoint_every": 0,
        },
        # far above any latency: lambda stays 0, so measured (run-dependent) latency cannot move the gates
        "target": {"latency_ms": 1.0e6, "phase": "decode", "batch_size": 2, "context_len": 8},
        "proxy": {"mode": "analytic", "calib_points": 2},
        "search": {"multiples": [1], "modes": ["floor"]},
        "finetune": {"steps": FT_STEPS, "eval_every": 1, "lr": 1e-3, "warmup_steps": 0},
        "measure": {"warmup": 1, "min_repeats": 2, "max_repeats": 3, "budget_s": 0.05},
        "output": {"dir": out, "plot": False, "keep_state": True},
    }


def _slim_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run / "slim").glob("*.safetensors"))
    assert files
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """A tiny LLaMA teacher and a one-process run of the recipe: (tmp folder, run folder)."""
    from tests.test_lm_job import tiny_teacher

    tmp = tmp_path_factory.mktemp("ddp")
    tiny_teacher(str(tmp / "teacher"))
    path = tmp / "one.yaml"
    path.write_text(yaml.safe_dump(_recipe(str(tmp / "teacher"), str(tmp / "one"))))
    cmd = [sys.executable, "-m", "hawada", "optimize", str(path)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    return tmp, tmp / "one"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_run_matches_one_rank_run_with_the_same_global_batch(one_rank_run, strategy):
    tmp, one = one_rank_run
    recipe = _recipe(str(tmp / "teacher"), str(tmp / strategy))
    recipe["distributed"] = {"strategy": strategy}
    recipe["train"]["checkpoint_every"] = 4  # a mid-run checkpoint too (sharded: gathered whole)
    path = tmp / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    p = torchrun("-m", "hawada", "optimize", str(path), nproc=2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    assert p.stdout.count("report: ") == 1  # rank 0 alone prints the report
    runs = {"one": one, "two": tmp / strategy}

    reports = {k: json.loads((v / "report.json").read_text()) for k, v in runs.items()}
    assert reports["one"]["distributed"] == {"world": 1, "backend": None, "replica_checks": 0}
    # the 2-rank run checked after every gate step that logits, lambda and proxy were identical
    assert reports["two"]["distributed"] == {"world": 2, "backend": "gloo", "replica_checks": STEPS}

    # rank 0 alone wrote the metrics: one line per gate and fine-tune step, not two
    lines = [json.loads(x) for x in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["phase"] == "gates"] == list(range(1, STEPS + 1))
    ref = [json.loads(x) for x in (runs["one"] / "metrics.jsonl").read_text().splitlines()]
    kd1 = [r["kd"] for r in ref if r["phase"] == "gates"]
    kd2 = [r["kd"] for r in lines if r["phase"] == "gates"]
    assert kd2 == pytest.approx(kd1, rel=1e-4)  # the mean over the global batch, step by step

    # gates, student weights and optimizer states after gate training, and the fine-tuned slim
    # model, agree (a sharded run's checkpoint holds whole tensors, like a one-process one)
    ck = {k: load_checkpoint(str(v / "state" / "checkpoints"))[0] for k, v in runs.items()}
    assert ck["one"].keys() == ck["two"].keys()
    logits1, logits2 = ck["one"]["student.hawada_gates.logits"], ck["two"]["student.hawada_gates.logits"]
    assert not torch.equal(logits1, torch.full_like(logits1, 0.5))  # the gates did train
    assert torch.allclose(logits2, logits1, atol=1e-4, rtol=1e-4)
    for k, v in ck["one"].items():
        if k.startswith(("student.", "opt_")) and v.is_floating_point():
            assert ck["two"][k].shape == v.shape, k
            assert torch.allclose(ck["two"][k], v, atol=1e-4, rtol=1e-3), k
    assert reports["two"]["layout"]["slim"] == reports["one"]["layout"]["slim"]
    w1, w2 = _slim_weights(runs["one"]), _slim_weights(runs["two"])
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w2[k], w1[k], atol=1e-4, rtol=1e-3), k


def _gate_steps(metrics) -> list[int]:
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [r["step"] for r in recs if r["phase"] == "gates"]


def test_sigint_to_torchrun_stops_every_rank_at_one_step_and_resume_is_exact(tmp_path):
    """SIGINT to a real torchrun: both ranks stop after the same step, rank 0 checkpoints; the
    resumed 2-rank run ends with the gates and weights of an uninterrupted 2-rank run."""
    import shutil
    import signal
    import time

    from tests.test_lm_job import tiny_teacher

    steps = 400
    tiny_teacher(str(tmp_path / "teacher"))
    recipe = _recipe(str(tmp_path / "teacher"), str(tmp_path / "run"))
    recipe["train"]["steps"] = steps
    recipe["finetune"]["steps"] = 0
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "hawada", "optimize", str(path)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(_gate_steps(metrics)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    said = [ln for ln in err.splitlines() if "SIGINT received: stopped after gate step" in ln]
    stopped = {int(ln.split("gate step ")[1].split(",")[0]) for ln in said}
    assert len(said) == 2 and len(stopped) == 1, err[-3000:]  # each rank says so, at the same step
    step = stopped.pop()
    assert 3 <= step < steps and not (tmp_path / "run").exists()
    ck = tmp_path / "run.partial" / "state" / "checkpoints"
    assert json.loads((ck / "latest.json").read_text())["step"] == step
    assert _gate_steps(metrics) == list(range(1, step + 1))  # rank 0 alone wrote each step once

    # reference: the same measurements, no gate checkpoint -> all gate steps in one go
    ref = tmp_path / "ref.partial"
    shutil.copytree(tmp_path / "run.partial", ref)
    shutil.rmtree(ref / "state" / "checkpoints")
    os.remove(ref / "metrics.jsonl")
    for run in ("run", "ref"):
        p = torchrun("-m", "hawada", "optimize", "--resume", str(tmp_path / run))
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
        assert ("resuming gate training after step" in p.stdout) == (run == "run")
    a_t, a, _ = load_checkpoint(str(tmp_path / "run" / "state" / "checkpoints"))
    b_t, b, _ = load_checkpoint(str(tmp_path / "ref" / "state" / "checkpoints"))
    assert a["step"] == b["step"] == steps
    for k in a_t:
        if k.startswith(("student.", "opt_", "lam")):
            assert torch.equal(a_t[k], b_t[k]), k
    assert _gate_steps(tmp_path / "run" / "metrics.jsonl") == list(range(1, steps + 1))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failed_checkpoint_write_on_rank_0_stops_both_ranks_within_seconds(tmp_path):
    """Rank 0's checkpoint write fails (an OSError, as on a full disk) where rank 1 would go on
    into the next step's collective: both processes exit by themselves within 30 s of the fault,
    with a non-zero code, each naming the error in one line. The process group has the recipe's
    timeout.

    The ranks are launched directly, not by torchrun, whose agent stops the remaining workers
    once one has exited: here how each process ends is its own doing."""
    import time

    from tests.test_lm_job import tiny_teacher

    tiny_teacher(str(tmp_path / "teacher"))
    recipe = _recipe(str(tmp_path / "teacher"), str(tmp_path / "run"))
    recipe["train"]["checkpoint_every"] = 2  # the first write, after gate step 2 of 6, fails
    recipe["distributed"] = {"timeout_s": 90}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    port = str(_free_port())
    procs, files = [], []
    for rank in range(2):
        env = _env()
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        out = open(tmp_path / f"rank{rank}.out", "w")  # noqa: SIM115 - closed below
        err = open(tmp_path / f"rank{rank}.err", "w")  # noqa: SIM115
        files += [out, err]
        cmd = [
            sys.executable,
            "tests/dist_worker.py",
            "optimize_failing_checkpoint",
            str(tmp_path),
            str(path),
        ]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err))
    fault_file = tmp_path / "fault.json"
    ended: dict[int, float] = {}
    start = time.monotonic()
    try:
        while len(ended) < 2 and time.monotonic() - start < 300:
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = time.time()
            if fault_file.exists() and time.time() - json.loads(fault_file.read_text())["time"] > 40:
                break  # far past the bound: a rank is left waiting
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    errs = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    assert fault_file.exists(), errs[0][-3000:]
    fault = json.loads(fault_file.read_text())
    assert fault["timeout_s"] == 90  # distributed.timeout_s reached the process group
    line = "OSError: [Errno 28] No space left on device (injected checkpoint fault)"
    for r, p in enumerate(procs):
        assert r in ended, f"rank {r} still running 40 s after the fault: {errs[r][-3000:]}"
        exit_s = ended[r] - fault["time"]
        assert exit_s < 30, f"rank {r} exited {exit_s:.1f} s after the fault"
        assert p.returncode != 0
        # the traceback ends with it (torch prefixes the lines of a rank with "[rank<r>]: ")
        assert sum(ln.endswith(line) for ln in errs[r].splitlines()) == 1, errs[r][-3000:]
    # the run failed before its first checkpoint: nothing is left behind
    assert not (tmp_path / "run.partial").exists() and not (tmp_path / "run").exists()
