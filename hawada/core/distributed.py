"""Data-parallel gate training on ``torch.distributed`` (launched by ``torchrun``).

Every rank holds the whole gated student and the teacher; each step every rank takes its
slice of the same global batch, DDP averages the gradients (weights AND gate logits), so the
gates, lambda and the proxy stay identical on every rank — :func:`check_replicated` verifies
that rather than assuming it. Latency is measured on rank 0 only (the other ranks wait) and the
result is broadcast; rank 0 alone writes files. Rank 0's own work goes through :func:`on_main`
or :func:`main_only`, which raise its failure on every rank. Only torch.distributed collectives
are used.

With one process (no ``WORLD_SIZE`` > 1 in the environment) every helper here is a no-op.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from hawada.errors import InputError

T = TypeVar("T")


class ReplicaMismatch(RuntimeError):
    """State that must be identical on every rank differs between ranks."""


class ShardError(InputError):
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


def init_from_env(device: str, timeout_s: float | None = None) -> DistEnv:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    Backend: gloo for CPU, nccl for CUDA; on CUDA each process uses ``cuda:LOCAL_RANK``.
    ``timeout_s``: how long a collective may wait for the other ranks before it fails (the
    recipe's ``distributed.timeout_s``; None: torch's default). Returns :data:`SINGLE` when not
    launched with several processes.
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
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, timeout=timeout)
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

    A failure on rank 0, ``BaseException`` included (KeyboardInterrupt, SystemExit), is sent to
    the other ranks and raised there too (same type and message whenever the exception can be
    rebuilt there, else a RuntimeError naming its type); rank 0 re-raises its own exception
    object. So no rank is left waiting in a collective behind rank 0's work (docs/DESIGN.md,
    "Failure"). A result that cannot be pickled is a TypeError on every rank.
    """
    if not env.enabled:
        return fn()
    if env.is_main:
        try:
            value = fn()
            blob = _dumps(("ok", value))
        except BaseException as e:
            _send_error(e, env)
            raise
        broadcast_object(blob, env)
        return value
    kind, body = pickle.loads(broadcast_object(b"", env))
    if kind == "err":
        raise _rebuild_error(body)
    return body


def main_only(env: DistEnv, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; its result stays there (None on the other ranks).

    For rank-0 side effects that the other ranks must not run past unnoticed (checkpoint and
    metrics writes): every rank calls it, one all-reduce tells them whether rank 0 failed, and a
    failure is raised on every rank as by :func:`on_main`. Nothing is pickled when ``fn``
    succeeds, so its result may be anything (e.g. an open file).
    """
    if not env.enabled:
        return fn()
    value = None
    if env.is_main:
        try:
            value = fn()
        except BaseException as e:
            _send_error(e, env, announce=True)
            raise
    if any_rank(False, env):  # True only when rank 0 announced a failure
        _, body = pickle.loads(broadcast_object(b"", env))
        raise _rebuild_error(body)
    return value


def _dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj)
    except Exception as e:
        raise TypeError(f"rank 0's result cannot be sent to the other ranks ({type(e).__name__}: {e})") from e


def _error_blob(e: BaseException) -> bytes:
    """``e`` as the other ranks can raise it: the exception itself when it survives a pickle
    round trip (attributes such as an OSError's errno kept), else its type and message, else a
    RuntimeError naming its type."""
    for payload in (e, (type(e), str(e))):
        try:
            blob = pickle.dumps(("err", payload))
            # an __init__ whose signature differs from the exception's args, or a class defined
            # inside a function, fails here rather than on the receiving ranks
            pickle.loads(blob)
            return blob
        except Exception:
            continue
    return pickle.dumps(("err", (RuntimeError, f"{type(e).__qualname__}: {e}")))


def _send_error(e: BaseException, env: DistEnv, announce: bool = False) -> None:
    """Rank 0: tell the other ranks that its work failed with ``e`` (``announce``: first answer
    the all-reduce they wait in, see :func:`main_only`)."""
    try:
        if announce:
            any_rank(True, env)
        broadcast_object(_error_blob(e), env)
    except Exception:
        # the group is already broken (another rank is gone): rank 0 raises ``e`` all the same,
        # the error to report rather than the failed send
        pass


def _rebuild_error(body: Any) -> BaseException:
    """The exception a receiving rank raises for rank 0's (see :func:`_error_blob`)."""
    if isinstance(body, BaseException):
        return body
    cls, msg = body
    try:
        return cls(msg)
    except Exception:  # a constructor that does not take one message
        return RuntimeError(f"{cls.__qualname__}: {msg}")


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

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def data_parallel(model: nn.Module, fn: Callable[[nn.Module, Any], Any], env: DistEnv) -> nn.Module:
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


# ---------------------------------------------------------------------------- FSDP2 (sharded)
def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fully_shard_layers(model: nn.Module, units: list[nn.Module], env: DistEnv) -> nn.Module:
    """Shard each of ``units`` across all ranks with FSDP2 ``fully_shard`` (in place).

    Parameters outside the units (embeddings, norms, heads, the GateStore's logits) stay
    replicated on every rank; their gradients are averaged by :func:`sync_replicated_grads`.
    Each unit's parameters are all-gathered for its forward and backward and freed after.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dev = next(model.parameters()).device
    mesh = init_device_mesh(dev.type, (env.world,))
    for u in units:
        fully_shard(u, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def sync_replicated_grads(params: Iterable[torch.Tensor], env: DistEnv) -> None:
    """Average over the ranks the gradients of replicated (non-sharded) parameters.

    One all-reduce of the flattened gradients; sharded (DTensor) parameters are skipped (FSDP
    reduce-scatters those itself)."""
    grads = [p.grad for p in params if p.grad is not None and not is_dtensor(p)]
    if not env.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device(env))
    dist.all_reduce(flat)
    flat /= env.world
    off = 0
    with torch.no_grad():
        for g in grads:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def local_grads_finite(params: Iterable[torch.Tensor], env: DistEnv) -> bool:
    """True on every rank iff every gradient element on every rank is finite."""
    sums = []
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if is_dtensor(p.grad) else p.grad
            sums.append(g.float().sum())
    ok = not sums or bool(torch.isfinite(torch.stack(sums)).all())
    return not any_rank(not ok, env)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, env: DistEnv) -> float:
    """``clip_grad_norm_`` over a mix of sharded (DTensor) and replicated parameters.

    The squared norms of the local shards are summed over the ranks; replicated gradients
    (identical everywhere) count once. Returns the total norm before clipping.
    """
    sharded, replicated = [], []
    for p in params:
        if p.grad is None:
            continue
        if is_dtensor(p.grad):
            sharded.append(p.grad.to_local())
        else:
            replicated.append(p.grad)
    sq = torch.zeros((), dtype=torch.float64)
    for g in sharded:
        sq += g.detach().double().pow(2).sum().cpu()
    if env.enabled and sharded:
        t = sq.to(_comm_device(env))
        dist.all_reduce(t)
        sq = t.cpu()
    for g in replicated:
        sq += g.detach().double().pow(2).sum().cpu()
    total = float(sq.sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for g in sharded + replicated:
                g.mul_(coef)
    return total


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (an all-gather: every rank must call it), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sharded tensor gathered whole (collective, in order)."""
    return {k: full_tensor(v).detach() for k, v in model.state_dict().items()}


def reshard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` placed like the DTensor ``like`` (this rank keeps its shard); plain otherwise."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)


def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a whole (unsharded) state dict into a model whose layers may be sharded."""
    own = model.state_dict()
    model.load_state_dict({k: reshard_like(sd[k], own[k]) if k in sd else sd[k] for k in own}, strict=True)


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` with sharded state tensors gathered whole (collective, in order)."""
    sd = opt.state_dict()
    return {
        "state": {i: {k: full_tensor(v) for k, v in st.items()} for i, st in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }


def reshard_optimizer_state(opt: torch.optim.Optimizer, sd: dict) -> dict:
    """A whole optimizer state dict placed like ``opt``'s parameters (for ``load_state_dict``)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {
            k: reshard_like(v, p) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in st.items()
        }
    return {"state": state, "param_groups": sd["param_groups"]}
