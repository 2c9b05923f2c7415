"""Data-parallel gate training on ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the whole gated student and the teacher; each step every rank takes its
slice of the same global batch, DDP averages the gradients (weights AND gate logits), so the
gates, lambda and the proxy stay identical on every rank — :func:`check_replicated` verifies
that rather than assuming it. Latency is measured on rank 0 only (the other ranks wait) and the
result is broadcast; rank 0 alone writes files. Only torch.distributed collectives are used.

With one process (no ``WORLD_SIZE`` > 1 in the environment) every helper here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


class ReplicaMismatch(RuntimeError):
    """State that must be identical on every rank differs between ranks."""


class ShardError(ValueError):
    """A global batch that cannot be split evenly across the ranks."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job. ``world == 1``: not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # this process initialised the group (and destroys it)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def to_dict(self) -> dict:
        return {"world": self.world, "backend": self.backend}


SINGLE = DistEnv()


def init_from_env(device: str) -> DistEnv:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Backend: gloo for CPU, nccl for CUDA; on CUDA each process uses ``cuda:LOCAL_RANK``.
    Returns :data:`SINGLE` when not launched with several processes.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return SINGLE
    dev = torch.device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dist.get_backend(), owns)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if this process created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str, env: DistEnv) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for a CUDA job, else ``device``."""
    dev = torch.device(device)
    if env.enabled and dev.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return dev


def _comm_device(env: DistEnv) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if env.backend == "nccl" else torch.device("cpu")


def broadcast_object(obj: T, env: DistEnv, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (picklable Python objects; small)."""
    if not env.enabled:
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device(env) if env.backend == "nccl" else None)
    return box[0]  # type: ignore[return-value]


def broadcast_tensors(tensors: Iterable[torch.Tensor], env: DistEnv, src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values."""
    if not env.enabled:
        return
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(_comm_device(env)).contiguous()
            dist.broadcast(buf, src=src)
            if buf.data_ptr() != t.data_ptr():
                t.copy_(buf)


def on_main(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give its result to every rank.

    An exception on rank 0 is re-raised on every rank (same type when it can be rebuilt from
    its message), so no rank is left waiting in a collective.
    """
    if not env.enabled:
        return fn()
    payload: tuple[str, Any]
    if env.is_main:
        try:
            payload = ("ok", fn())
        except Exception as e:  # forwarded, then re-raised here too
            payload = ("err", (type(e), str(e)))
            broadcast_object(payload, env)
            raise
    else:
        payload = ("", None)
    payload = broadcast_object(payload, env)
    if payload[0] == "err":
        cls, msg = payload[1]
        try:
            err = cls(msg)
        except Exception:
            err = RuntimeError(msg)
        raise err
    return payload[1]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is True on at least one."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(env))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(x: float, env: DistEnv) -> float:
    """The mean of a scalar over all ranks (e.g. the step's KD loss over the global batch)."""
    if not env.enabled:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t)
    return float(t.item()) / env.world


def check_replicated(named: dict[str, torch.Tensor], env: DistEnv, what: str = "") -> float:
    """Raise :class:`ReplicaMismatch` unless every tensor is bitwise equal on all ranks.

    Compares the element-wise max and min over ranks (two all-reduces of the concatenation);
    returns the largest difference found (0.0). ``named``: name -> tensor (any shape).
    """
    if not env.enabled or not named:
        return 0.0
    dev = _comm_device(env)
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in named.values()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    diff = (hi - lo).abs()
    diff = torch.where(torch.isnan(flat), torch.zeros_like(diff), diff)
    if bool((diff > 0).any()):
        off = 0
        for name, t in named.items():
            n = t.numel()
            d = float(diff[off : off + n].max()) if n else 0.0
            if d > 0:
                raise ReplicaMismatch(
                    f"{name} differs between the {env.world} ranks{' ' + what if what else ''} "
                    f"(max difference {d:.3g}): data-parallel state must stay identical"
                )
            off += n
    return 0.0


def shard_batch(batch: Any, env: DistEnv) -> Any:
    """This rank's contiguous slice of a global batch (every tensor split along dim 0).

    Rank r of W takes rows ``[r*B/W, (r+1)*B/W)``: the W slices together are the batch a
    one-process run takes, so the averaged gradient equals the one-process gradient.
    """
    if not env.enabled:
        return batch
    if isinstance(batch, torch.Tensor):
        b = batch.shape[0] if batch.dim() else 0
        if b % env.world:
            raise ShardError(
                f"global batch of {b} rows cannot be split evenly across {env.world} ranks "
                "(make data.batch_size a multiple of the number of processes)"
            )
        k = b // env.world
        return batch[env.rank * k : (env.rank + 1) * k]
    if isinstance(batch, dict):
        return {k: shard_batch(v, env) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(shard_batch(v, env) for v in batch)
    return batch


class ShardedBatches:
    """Wraps a loader so that each rank iterates over its slice of every global batch.

    For a ``torch.utils.data.DataLoader`` only the rank's rows are loaded (its batch sampler is
    sliced before any item is read); other iterables are sliced after loading. The data order
    (seeding, epochs, position on resume) is that of the wrapped loader.
    """

    def __init__(self, loader: Iterable, env: DistEnv) -> None:
        self.loader, self.env = loader, env
        self._sliced = None
        from torch.utils.data import DataLoader

        if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
            bs = getattr(loader.batch_sampler, "batch_size", None)
            if bs is not None and bs % env.world:
                raise ShardError(
                    f"global batch of {bs} rows cannot be split evenly across {env.world} ranks "
                    "(make data.batch_size a multiple of the number of processes)"
                )
            self._sliced = DataLoader(
                loader.dataset,
                batch_sampler=_RankSlice(loader.batch_sampler, env),
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
            )

    @property
    def sampler(self) -> Any:
        """The sampler that orders the global batches (what epoch reseeding acts on)."""
        return getattr(self.loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        if self._sliced is not None:
            yield from self._sliced
            return
        for batch in self.loader:
            yield shard_batch(batch, self.env)


class _RankSlice:
    """A batch sampler yielding this rank's contiguous slice of each global index batch."""

    def __init__(self, batch_sampler: Any, env: DistEnv) -> None:
        self.batch_sampler, self.env = batch_sampler, env

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for idx in self.batch_sampler:
            if len(idx) % self.env.world:
                raise ShardError(
                    f"a batch of {len(idx)} rows cannot be split evenly across {self.env.world} ranks "
                    "(use drop_last or a batch size that divides the dataset)"
                )
            k = len(idx) // self.env.world
            yield list(idx[self.env.rank * k : (self.env.rank + 1) * k])


class ForwardOf(nn.Module):
    """``forward(batch) = fn(model, batch)``: gives DDP one module whose forward is the
    adapter's output, whatever inputs and sub-modules the adapter uses."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


def data_parallel(model: nn.Module, fn: Callable[[nn.Module, Any], torch.Tensor], env: DistEnv) -> nn.Module:
    """A module computing ``fn(model, batch)``; wrapped in DDP when distributed.

    ``static_graph``: the set of parameters that get gradients is the same every step (e.g. a
    pooler the loss never reads), which DDP then handles without per-step graph searches.
    """
    fwd = ForwardOf(model, fn)
    if not env.enabled:
        return fwd
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(model.parameters()).device
    ids = [dev.index] if dev.type == "cuda" else None
    return DDP(fwd, device_ids=ids, static_graph=True)
