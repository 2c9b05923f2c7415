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
