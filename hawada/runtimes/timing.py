"""Timing saved artifacts, each in its own child process, interleaved by rounds.

Why children: ONNX Runtime's intra-op thread pool slows a torch model timed in the same process
(the MiniLM teacher went from ~650 to ~1,160 ms with ORT loaded beside it), and torch's OpenMP
pool could as well slow ORT. So every artifact is loaded by its own worker process
(``python -m hawada.runtimes.worker``) with a fixed thread count, and one process never hosts two
runtimes.

Why interleaved rounds across processes rather than both artifacts in one ORT process: two ORT
sessions in one process each own a spinning intra-op pool, so the idle one would still steal
cycles from the timed one, the very effect we keep out; and one process per artifact is the only
layout that also holds for torch artifacts. The workers stay alive and idle (blocked on a pipe)
while another one runs, and the parent runs one round of A, then one of B, ..., with a short
pause after each round so that a pool's spin-wait ends before the next process starts. Drift of a
shared machine then falls on every artifact alike, which the ratios (``profiler.ratio_ci``) need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

import torch

import hawada
from hawada.core.profiler import LatencyResult, summarize_samples
from hawada.errors import InputError
from hawada.runtimes.base import Inputs, named_inputs

SETTLE_S = 0.05  # pause after a round: ORT's spin-wait (ms) ends before the next process runs


@dataclass
class Artifact:
    """One artifact to time: a folder written by ``save_artifact`` and the runtime to load."""

    folder: str
    runtime: str


class _Worker:
    def __init__(self, label: str, art: Artifact, inputs_path: str, threads: int, log: IO) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(hawada.__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        self.label, self.log = label, log
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hawada.runtimes.worker",
                art.folder,
                art.runtime,
                inputs_path,
                str(threads),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )

    def ask(self, command: str | None = None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-2000:]
            raise RuntimeError(
                f"timing worker for {self.label} exited with code {self.proc.returncode}:\n{tail}"
            )
        msg = json.loads(line)
        if "input_error" in msg:  # bad input the worker found (e.g. a folder without the artifact)
            raise InputError(msg["input_error"])
        return msg

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def save_inputs(names: list[str], tensors: list[torch.Tensor], path: str) -> None:
    """The example inputs a worker process times, as safetensors (no pickle crosses processes)."""
    from safetensors.torch import save_file

    save_file(
        {f"t{i}": t.detach().cpu().contiguous() for i, t in enumerate(tensors)},
        path,
        metadata={"names": json.dumps(names)},
    )


def load_inputs(path: str) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` written by :func:`save_inputs`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        names = json.loads(f.metadata()["names"])
        tensors = [f.get_tensor(f"t{i}") for i in range(len(f.keys()))]
    return names, tensors


def time_artifacts(
    artifacts: dict[str, Artifact],
    inputs: Inputs,
    threads: int = 2,
    warmup: int = 3,
    rounds: int = 5,
    repeats: int = 4,
) -> dict[str, LatencyResult]:
    """Latency of each artifact on ``inputs``, each in its own worker process with ``threads``
    threads: ``warmup`` untimed calls each, then ``rounds`` rounds in which every artifact in
    turn makes ``repeats`` timed calls. Returns ``label -> LatencyResult`` with ``rounds *
    repeats`` samples (ms), for ``summarize_samples`` / ``ratio_ci``.
    """
    if rounds < 1 or repeats < 1 or warmup < 0 or threads < 1:
        raise InputError(
            f"rounds, repeats, threads must be >= 1, warmup >= 0 (got {rounds}, {repeats}, {threads}, {warmup})"
        )
    names, tensors = named_inputs(inputs)
    samples: dict[str, list[float]] = {k: [] for k in artifacts}
    workers: dict[str, _Worker] = {}
    with tempfile.TemporaryDirectory(prefix="hawada-timing-") as tmp:
        inputs_path = os.path.join(tmp, "inputs.safetensors")
        save_inputs(names, tensors, inputs_path)
        logs = {k: open(os.path.join(tmp, f"{i}.log"), "w+") for i, k in enumerate(artifacts)}  # noqa: SIM115
        try:
            for k, art in artifacts.items():
                workers[k] = _Worker(k, art, inputs_path, threads, logs[k])
            ready = {k: w.ask() for k, w in workers.items()}  # all load at once; nothing is timed yet
            for w in workers.values():  # warm up one at a time, as the timed rounds run
                w.ask(f"warm {warmup}")
                time.sleep(SETTLE_S)
            for _ in range(rounds):
                for k, w in workers.items():
                    samples[k] += w.ask(f"run {repeats}")["samples_ms"]
                    time.sleep(SETTLE_S)
        finally:
            for w in workers.values():
                w.close()
            for f in logs.values():
                f.close()
    shapes = [list(t.shape) for t in tensors]
    out = {}
    for k, xs in samples.items():
        s = summarize_samples(xs)
        out[k] = LatencyResult(
            **s,
            n=len(xs),
            device="cpu",
            dtype=ready[k]["dtype"],
            shapes=shapes,
            warmup=warmup,
            timer=f"child:{artifacts[k].runtime}",
            threads=threads,
            samples_ms=list(xs),
            runtime=artifacts[k].runtime,
        )
    return out
