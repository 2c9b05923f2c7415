"""A run's latency meter in the runtime the recipe deploys to (``measure.runtime``;
docs/DESIGN.md, "Runtimes").

``RuntimeMeter(...)`` is a ``Meter``: ``meter(model) -> LatencyResult`` for a *plain* model, as
``profiler.latency_meter`` is for eager PyTorch. It converts the model into its deployed form and
times that:

- torch runtimes (``int8_dynamic``, ``compile``) in this process, with the same timing loop and
  stopping rule as eager (``measure_latency_ms``);
- ONNX Runtime (``onnxruntime``, ``onnxruntime_int8``) in long-lived worker processes
  (``hawada.runtimes.worker``): ORT loaded beside torch slows torch, and a search of many trials
  must not pay a process start per model. A worker holds one model at a time and is told to
  ``load`` the next one; up to :data:`POOL` workers stay alive, so the models that
  ``measure_pooled`` interleaves (keep-all and its rivals) each keep their own process and the
  interleaving holds in the runtime.

A model's deployed form is built once and reused while its weights are unchanged (the
fingerprint: every tensor's storage and in-place version counter), for the :data:`POOL` models
timed last.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hawada.core.loop import to_device
from hawada.core.profiler import (
    LatencyResult,
    MeasureConfig,
    _describe,
    adaptive_samples,
    measure_latency_ms,
    summarize_samples,
)
from hawada.errors import InputError
from hawada.runtimes.base import Deployed, Inputs, build, conform, get_runtime, named_inputs, save_artifact
from hawada.runtimes.timing import SETTLE_S, Artifact, _Worker, save_inputs

POOL = 4  # deployed forms (and ORT worker processes) kept alive at once
CHILD_RUNTIMES = ("onnxruntime", "onnxruntime_int8")  # timed in worker processes
CPU_RUNTIMES = ("int8_dynamic", "onnxruntime", "onnxruntime_int8")  # run on the CPU only


def fingerprint(model: nn.Module) -> tuple:
    """What identifies a model's weights now: each tensor's storage and in-place version (an
    optimizer step or ``load_state_dict`` bumps the version, so a changed model is rebuilt)."""
    return tuple((t.data_ptr(), _version(t), tuple(t.shape)) for t in [*model.parameters(), *model.buffers()])


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version (and is changed in inference mode only)
        return -1


def check_runtime(runtime: str, device: str) -> None:
    """Refuse, in one line, a runtime that is unknown, not installed or not runnable on
    ``device`` (before a run does any work)."""
    rt = get_runtime(runtime)
    rt.require()
    if runtime in CPU_RUNTIMES and torch.device(device).type != "cpu":
        raise InputError(f"measure.runtime {runtime!r} runs on the CPU only (device is {device!r})")


class RuntimeMeter:
    """``meter(model) -> LatencyResult`` of ``model``'s deployed form in ``runtime`` (see the module
    docstring). ``example_inputs`` are the job's latency inputs (``[B, L]`` token tensors or
    ``[B, C, H, W]`` images); ``threads`` is the workers' intra-op thread count."""

    def __init__(
        self,
        runtime: str,
        example_inputs: Inputs,
        device: str | torch.device,
        config: MeasureConfig | None = None,
        threads: int | None = None,
    ) -> None:
        check_runtime(runtime, str(device))
        self.runtime = runtime
        self.device = torch.device(device)
        self.config = config or MeasureConfig(runtime=runtime)
        self.inputs = to_device(example_inputs, self.device, non_blocking=False)
        self.threads = threads or torch.get_num_threads()
        self.child = runtime in CHILD_RUNTIMES
        self.built = 0  # deployed forms built (what the cache saves is visible in tests)
        # id(model) -> (weakref to it, fingerprint, payload): a bound call, or (folder, worker)
        self._cache: OrderedDict[int, tuple[Any, tuple, Any]] = OrderedDict()
        self._pool = _Pool()
        self._finalizer = weakref.finalize(self, self._pool.close)

    # -- building ------------------------------------------------------------------------------
    def _lookup(self, model: nn.Module) -> Any:
        key, fp = id(model), fingerprint(model)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is model and hit[1] == fp:
            self._cache.move_to_end(key)
            return hit[2]
        if hit is not None:
            self._drop(key)
        while len(self._cache) >= POOL:  # the least recently timed model gives up its place
            self._drop(next(iter(self._cache)))
        payload = self._build_child(model) if self.child else self._build_torch(model)
        self.built += 1
        self._cache[key] = (weakref.ref(model), fp, payload)
        return payload

    def _drop(self, key: int) -> None:
        _, _, payload = self._cache.pop(key)
        if self.child:
            folder, worker = payload
            self._pool.release(worker)
            shutil.rmtree(folder, ignore_errors=True)

    def _build_torch(self, model: nn.Module) -> Callable[[], Any]:
        was = model.training
        try:
            deployed: Deployed = build(model, self.inputs, self.runtime)
        finally:
            model.train(was)
        call = deployed.bind(self.inputs)
        if self.runtime == "compile":
            call()  # compiling is part of deploying, never of a timed (or warm-up) call
        return call

    def _build_child(self, model: nn.Module) -> tuple[str, _Worker]:
        folder = tempfile.mkdtemp(prefix=f"hawada-{self.runtime}-")
        was = model.training
        try:
            save_artifact(model, self.inputs, folder, self.runtime)
            worker = self._pool.acquire(folder, self.runtime, self.inputs, self.threads)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            model.train(was)
        return folder, worker

    # -- timing --------------------------------------------------------------------------------
    def __call__(self, model: nn.Module) -> LatencyResult:
        payload = self._lookup(model)
        names, tensors = named_inputs(self.inputs)
        if not self.child:
            res = measure_latency_ms(lambda *_: payload(), tuple(tensors), self.device, self.config)
            return dataclasses.replace(res, runtime=self.runtime)
        _, worker = payload
        cfg = self.config

        def run(n: int, warm: int) -> list[float]:
            if warm:
                worker.ask(f"warm {warm}")
            return worker.ask(f"run {n}")["samples_ms"]

        xs = adaptive_samples(run, cfg.warmup, cfg.min_repeats, cfg.max_repeats, cfg.budget_s, cfg.rel_ci)
        time.sleep(SETTLE_S)  # the pool's spin-wait ends before the next model runs
        shapes, dtype = _describe(list(tensors))
        return LatencyResult(
            **summarize_samples(xs),
            n=len(xs),
            device="cpu",
            dtype=dtype,
            shapes=shapes,
            warmup=cfg.warmup,
            timer=f"child:{self.runtime}",
            threads=self.threads,
            samples_ms=list(xs),
            runtime=self.runtime,
        )

    def close(self) -> None:
        """Stop the worker processes and remove the artifacts (also done when the meter is freed)."""
        for key in list(self._cache):
            self._drop(key)
        self._finalizer()


class _Pool:
    """The worker processes of one meter: at most :data:`POOL`, each holding one artifact."""

    def __init__(self) -> None:
        self.idle: list[_Worker] = []
        self.busy: list[_Worker] = []
        self.tmp: str | None = None
        self.inputs_path = ""

    def acquire(self, folder: str, runtime: str, inputs: Inputs, threads: int) -> _Worker:
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix="hawada-meter-")
            self.inputs_path = os.path.join(self.tmp, "inputs.safetensors")
            save_inputs(*named_inputs(inputs), self.inputs_path)
        if self.idle:  # a process whose model was dropped loads this one
            worker = self.idle.pop()
            worker.ask(f"load {folder}")
        else:
            n = len(self.busy)
            log = open(os.path.join(self.tmp, f"worker{n}.log"), "w+")  # noqa: SIM115  (closed in close())
            worker = _Worker(
                f"{runtime} worker {n}", Artifact(folder, runtime), self.inputs_path, threads, log
            )
            worker.ask()
        self.busy.append(worker)
        return worker

    def release(self, worker: _Worker) -> None:
        self.busy.remove(worker)
        self.idle.append(worker)

    def close(self) -> None:
        for w in self.idle + self.busy:
            w.close()
            w.log.close()
        self.idle, self.busy = [], []
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class DeployedModel(nn.Module):
    """A plain model's deployed form, as the jobs score it: ``task_output(inputs)`` (and calling
    it) gives the runtime's output (``[B, D]`` embeddings or ``[B, C]`` logits, float32, on the
    inputs' device), so agreement metrics describe the model users deploy."""

    def __init__(self, model: nn.Module, runtime: str, example_inputs: Inputs) -> None:
        super().__init__()
        was = model.training
        try:
            self.deployed = build(model, example_inputs, runtime)
        finally:
            model.train(was)
        self.runtime = runtime

    def task_output(self, inputs: Inputs) -> torch.Tensor:
        inputs = conform(inputs, self.deployed.names)  # the names and order the deployed form takes
        _, tensors = named_inputs(inputs)
        return self.deployed(inputs).to(tensors[0].device)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.task_output(kwargs if kwargs else args[0])
