"""Run by ``torchrun`` from tests/test_distributed.py: one scenario per call, each rank writes
``<out>/rank<r>.json`` with what it saw (the test compares the ranks' files).

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py SCENARIO OUT_DIR

``optimize_failing_checkpoint OUT_DIR RECIPE`` runs ``hawada optimize RECIPE`` with a failing
checkpoint write on rank 0 instead, and exits as the command does.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import threading

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hawada  # noqa: E402
from hawada.adapters.base import get_adapter  # noqa: E402
from hawada.core.calibrate import calibration_logits  # noqa: E402
from hawada.core.distributed import (  # noqa: E402
    ReplicaMismatch,
    ShardedBatches,
    any_rank,
    barrier,
    broadcast_object,
    check_replicated,
    init_from_env,
    main_only,
    on_main,
    shutdown,
)
from hawada.core.loop import reseed_loader  # noqa: E402
from hawada.core.proxy_cost import LatencyProxy  # noqa: E402
from hawada.core.train import LagrangeTrainer, TrainConfig  # noqa: E402
from tests.helpers import tiny_resnet  # noqa: E402


class TwoArgError(Exception):
    """An exception whose constructor does not take its message: it cannot be rebuilt from it."""

    def __init__(self, what: str, n: int) -> None:
        super().__init__(f"{what} failed {n} times")


def gather(x: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return out


def collectives(env) -> dict:
    res: dict = {"rank": env.rank, "world": env.world, "backend": env.backend}
    res["broadcast"] = broadcast_object({"from": env.rank}, env)
    res["any_rank_1"] = any_rank(env.rank == 1, env)
    res["any_none"] = any_rank(False, env)

    def boom() -> int:
        raise ValueError("target latency 1 ms is below the fastest allowed keep set")

    try:
        on_main(env, boom)
        res["on_main_error"] = None
    except ValueError as e:
        res["on_main_error"] = str(e)
    res["on_main_value"] = on_main(env, lambda: 41 + env.rank)

    # a BaseException too: rank 0 re-raises its own object, the others one of the same type
    sent = KeyboardInterrupt("stopped on rank 0")

    def interrupt() -> int:
        raise sent

    try:
        on_main(env, interrupt)
        res["on_main_base"] = None
    except KeyboardInterrupt as e:
        res["on_main_base"] = [type(e).__name__, str(e), e is sent]
    try:
        main_only(env, lambda: sys.exit(3))
        res["main_only_exit"] = None
    except SystemExit as e:
        res["main_only_exit"] = e.code

    # an exception that cannot be rebuilt from its message reaches the others as a RuntimeError
    def two_args() -> int:
        raise TwoArgError("table", 3)

    try:
        on_main(env, two_args)
        res["odd_error"] = None
    except (TwoArgError, RuntimeError) as e:
        res["odd_error"] = [type(e).__name__, str(e)]
    # a result that cannot be pickled: an error on every rank rather than a rank left waiting
    try:
        on_main(env, threading.Lock)
        res["unpicklable"] = None
    except TypeError as e:
        res["unpicklable"] = str(e)
    # main_only shares nothing: rank 0 keeps its (unpicklable) result, the others get None
    kept = main_only(env, threading.Lock)
    res["main_only_value"] = None if kept is None else type(kept).__name__

    same = torch.arange(5.0)
    res["identical_ok"] = check_replicated({"w": same}, env) == 0.0
    try:
        check_replicated(
            {"w": same, "gate logits": torch.tensor([0.5, float(env.rank)])}, env, "after step 3"
        )
        res["mismatch"] = None
    except ReplicaMismatch as e:
        res["mismatch"] = str(e)

    # a DataLoader: each rank loads only its rows; the ranks' rows together = the global batch
    ds = TensorDataset(torch.arange(24))
    full = DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    sharded = ShardedBatches(DataLoader(ds, batch_size=4, shuffle=True, drop_last=True), env)
    reseed_loader(full, 7, 2)
    reseed_loader(sharded, 7, 2)
    ok = True
    for (g,), (mine,) in zip(full, sharded, strict=True):
        parts = gather(mine, env.world)
        ok = ok and torch.equal(torch.cat(parts), g)
    res["loader_shards_cover_global_batches"] = ok
    return res


def trainer_nan(env) -> dict:
    """Rank 1's half of the second global batch is NaN: every rank skips that step together."""
    torch.manual_seed(0)
    teacher = tiny_resnet()
    student = hawada.attach(copy.deepcopy(teacher), hawada.GateConfig(mode="hard_concrete"))
    store = hawada.gates(student)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    proxy = LatencyProxy(store, get_adapter("resnet").cost_terms(student, x), mode="analytic")
    widths = []
    for lg in calibration_logits(student, 3, 0):
        with torch.no_grad():
            store.logits.copy_(lg)
        widths.append(store.open_units())
    with torch.no_grad():
        store.logits.fill_(3.0)
    proxy.calibrate(widths, [float(w.sum()) / 10 for w in widths])
    keepall = float(proxy(store.seg_units))
    bad = x.clone()
    bad[4:] = float("nan")  # rows of rank 1 (of 2)
    batches = [(x, torch.zeros(8, dtype=torch.long)), (bad, torch.zeros(8, dtype=torch.long))] * 2
    cfg = TrainConfig(steps=4, progress=False, probe_every=0, lambda_lr=1.0, lr_gates=0.1, max_bad_steps=3)
    tr = LagrangeTrainer(student, teacher, proxy, 0.7 * keepall, cfg, env=env)
    torch.manual_seed(1)
    hist = tr.fit(ShardedBatches(batches, env))
    return {
        "rank": env.rank,
        "bad_total": tr.bad_total,
        "skipped": [h["step"] for h in hist if h.get("skipped")],
        "replica_checks": tr.replica_checks,
        "logits": store.logits.detach().tolist(),
        "lambda": float(tr.lam),
    }


def fsdp_resume(env, dtype: torch.dtype = torch.float32) -> dict:
    """A sharded (FSDP2) student in ``dtype``: 3 steps, checkpoint state, 3 more steps; a second
    sharded trainer restored from that state makes the same 3 steps exactly."""
    import transformers

    from hawada.core.checkpoint import set_rng_state
    from hawada.core.distributed import full_state_dict, full_tensor, fully_shard_layers, is_dtensor

    def build():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=32,
        )
        teacher = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
        student = hawada.attach(copy.deepcopy(teacher), hawada.GateConfig(group_size={"ffn": 8}))
        adapter = get_adapter("hf_decoder")
        store = hawada.gates(student)
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        proxy = LatencyProxy(store, adapter.cost_terms(student, batch), mode="analytic")
        full = store.seg_units.float()
        proxy.calibrate([full, (full * 0.5).round().clamp(min=1)], [10.0, 6.0])
        for m in (teacher, student):
            fully_shard_layers(m, adapter.shard_units(m), env)
        tcfg = TrainConfig(
            steps=6, progress=False, probe_every=0, lr_gates=0.1, lr_weights=1e-3, lambda_lr=1.0
        )
        tr = LagrangeTrainer(student, teacher, proxy, 0.6 * float(proxy(store.seg_units)), tcfg, env=env)
        return tr, batch

    tr, batch = build()
    start = [full_tensor(p).float().clone() for p in tr.master.params]
    mine = next(iter(ShardedBatches([batch], env)))
    for _ in range(3):
        tr.step(mine)
    tensors, js = tr.state()  # whole tensors (collective)
    tensors = {k: v.clone() for k, v in tensors.items()}
    js = json.loads(json.dumps(js))
    for _ in range(3):
        tr.step(mine)
    a = full_state_dict(tr.student)
    tr2, _ = build()
    tr2.load_state(tensors, js)
    set_rng_state(*tr2._pending_rng)  # what fit() does when it resumes
    for _ in range(3):
        tr2.step(mine)
    b = full_state_dict(tr2.student)
    end = [full_tensor(p).float() for p in tr.master.params]
    n = sum(x.numel() for x in start)
    low = [p for p in tr.weights if p.dtype != torch.float32]
    return {
        "weight_dtype": str(low[0].dtype) if low else "torch.float32",
        "masters_sharded": any(is_dtensor(m) for m in tr.master.masters),
        "master_dtype": str(tr.master.params[0].dtype),
        "changed": sum(int((x != y).sum()) for x, y in zip(start, end)) / n,
        "rank": env.rank,
        "sharded": tr.sharded,
        "whole_logits_in_state": list(tensors["student.hawada_gates.logits"].shape),
        "equal": all(torch.equal(a[k], b[k]) for k in a),
        "lambda": [float(tr.lam), float(tr2.lam)],
        "replica_checks": tr2.replica_checks,
    }


def optimize_failing_checkpoint(out: str, recipe: str) -> int:
    """``hawada optimize RECIPE`` in which rank 0's checkpoint write fails as on a full disk.

    ``<out>/fault.json`` gets the time of the fault (``time.time()``) and the timeout of the
    process group the run created (``timeout_s``).
    """
    import errno
    import time

    from hawada import cli
    from hawada.run import gates_phase

    def failing_save(*args, **kwargs) -> str:
        gloo = dist.group.WORLD._get_backend(torch.device("cpu"))
        fault = {"time": time.time(), "timeout_s": gloo.options._timeout.total_seconds()}
        tmp = os.path.join(out, "fault.json.tmp")
        with open(tmp, "w") as f:
            json.dump(fault, f)
        os.replace(tmp, os.path.join(out, "fault.json"))  # the test never reads a half-written file
        raise OSError(errno.ENOSPC, "No space left on device (injected checkpoint fault)")

    gates_phase.save_checkpoint = failing_save
    return cli.main(["optimize", recipe])


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    if scenario == "optimize_failing_checkpoint":
        raise SystemExit(optimize_failing_checkpoint(out, sys.argv[3]))
    env = init_from_env("cpu")
    try:
        res = {
            "collectives": collectives,
            "trainer_nan": trainer_nan,
            "fsdp_resume": fsdp_resume,
            "fsdp_resume_bf16": lambda e: fsdp_resume(e, torch.bfloat16),
        }[scenario](env)
        barrier(env)
    finally:
        shutdown(env)
    with open(os.path.join(out, f"rank{env.rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
