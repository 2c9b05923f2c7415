"""What every phase of a run works with: the recipe, the job, the teacher and the gated student."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from hawada.adapters.base import Adapter, get_adapter
from hawada.config import Recipe
from hawada.core.distributed import DistEnv, ShardedBatches, broadcast_tensors, local_device
from hawada.core.export import store_of
from hawada.core.gates import GateStore
from hawada.core.profiler import Meter, latency_meter
from hawada.errors import InputError
from hawada.jobs import Job, build_job
from hawada.run.folder import RunPaths
from hawada.runtimes.meter import RuntimeMeter, check_runtime

Log = Callable[[str], None]


def quiet(msg: str) -> None:
    """The log of ranks other than 0: they print nothing."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def check_measure_runtime(recipe: Recipe) -> None:
    """Refuse, in one line and before any work, a ``measure.runtime`` the run cannot time in: not
    installed (naming the extra), not runnable on the device, or combined with settings that time
    eager PyTorch only (docs/DESIGN.md, "Runtimes")."""
    name = recipe.measure.runtime
    if name == "eager":
        return
    check_runtime(name, recipe.device)
    if recipe.proxy.mode == "lut":
        raise InputError(
            f"proxy.mode: lut times its table's ops in eager PyTorch; with measure.runtime {name!r} use "
            "proxy.mode: analytic (calibrated on latencies measured in the runtime)"
        )
    if recipe.measure.timer == "cpp":
        raise InputError(f"measure.timer: cpp times eager PyTorch only; measure.runtime is {name!r}")
    if recipe.model.family == "hf_decoder":
        raise InputError(
            f"measure.runtime {name!r}: a decoder's timed call (prefill or decode with a KV cache) is timed "
            "in eager PyTorch only"
        )


def make_meter(recipe: Recipe, job: Job) -> Meter:
    """The one way this run times a plain model (recipe's measure settings, job's inputs): eager
    PyTorch, or the model's deployed form in ``measure.runtime``."""
    if recipe.measure.runtime == "eager":
        return latency_meter(job.latency_inputs, recipe.device, job.timed, config=recipe.measure)
    return RuntimeMeter(
        recipe.measure.runtime, job.latency_inputs, recipe.device, recipe.measure, recipe.threads or None
    )


@dataclass
class RunContext:
    """The pieces every phase uses. ``student`` is the gated copy of ``teacher``; ``train_loader``
    yields this rank's slice of each global batch; ``log`` prints on rank 0 only."""

    recipe: Recipe
    paths: RunPaths
    env: DistEnv
    device: torch.device
    job: Job
    adapter: Adapter
    teacher: nn.Module
    student: nn.Module
    store: GateStore
    meter: Meter
    train_loader: Iterable
    log: Log

    @property
    def dev(self) -> str:
        return str(self.device)


def build_context(
    recipe: Recipe,
    paths: RunPaths,
    env: DistEnv,
    log: Log,
    teacher_state: dict[str, torch.Tensor] | None = None,
) -> RunContext:
    """Load the job and its teacher, and attach gates to a copy of the teacher.

    ``teacher_state``: a teacher the first start of a resumed run trained (not trained again).
    """
    if teacher_state is not None:
        recipe = dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, epochs=0))
    device = local_device(recipe.device, env)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for but no CUDA device is available")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    get_adapter(recipe.model.family)  # an unknown family fails before any work
    check_measure_runtime(recipe)
    seed_everything(recipe.seed)
    job = build_job(recipe, device)
    teacher = job.teacher.to(device).eval()
    if teacher_state is not None:
        teacher.load_state_dict(teacher_state, strict=True)
    if env.enabled:  # e.g. a teacher the recipe trained: every rank starts from rank 0's
        broadcast_tensors(teacher.state_dict().values(), env)
    student = copy.deepcopy(teacher)
    job.adapter.attach(student, recipe.gates)
    store = store_of(student)
    log(f"gates: {len(store)} in {store.num_segments} segments")
    loader = ShardedBatches(job.train_loader, env) if env.enabled else job.train_loader
    return RunContext(
        recipe, paths, env, device, job, job.adapter, teacher, student, store, make_meter(recipe, job), loader,
        log,
    )  # fmt: skip
