"""What gate training and fine-tuning share: batches on the device and in a seeded order, a
guarded step, fp32 master weights of low-precision parameters, progress.

A step can meet a non-finite loss or gradient (a bad batch, an fp16 overflow). :class:`StepGuard`
makes such a step change nothing (no optimizer update, BatchNorm statistics restored), decides it
the same way on every rank, counts it, and after ``max_bad_steps`` in a row raises
:class:`NonFiniteError` naming the step (docs/DESIGN.md, "Failure").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hawada.core.distributed import (
    SINGLE,
    DistEnv,
    ShardedBatches,
    any_rank,
    full_tensor,
    local_grads_finite,
    reshard_like,
)
from hawada.errors import InputError


class NonFiniteError(InputError):
    """Too many non-finite steps in a row (loss or gradient)."""


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """``batch`` (tensor, mapping, list or tuple of them, nested) with every tensor on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch


def cycle(loader: Iterable) -> Iterator:
    """Endless iteration over ``loader`` (re-iterated each epoch)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the data loader yielded no batch")


def data_seed(seed: int, epoch: int) -> int:
    """The shuffling seed of one epoch: the data order is a function of (seed, epoch) alone."""
    return (seed * 1_000_003 + epoch * 7_919 + 1) % (2**63)


def reseed_loader(loader: Iterable, seed: int, epoch: int) -> None:
    """Make a shuffling DataLoader's order for ``epoch`` depend on (seed, epoch) only.

    The sampler's generator is reseeded (created when it has none); samplers with
    ``set_epoch`` (e.g. DistributedSampler) are told the epoch, and so are other iterables
    with a ``set_epoch`` method (they derive their order from their own seed and the epoch).
    A :class:`~hawada.core.distributed.ShardedBatches` passes it on to the loader it wraps.
    """
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(loader, ShardedBatches):
        loader = loader.loader
    if not isinstance(loader, DataLoader):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        return
    s = loader.sampler
    if hasattr(s, "set_epoch"):
        s.set_epoch(epoch)
        return
    gen = getattr(s, "generator", None)
    if gen is None and isinstance(s, RandomSampler):
        gen = s.generator = torch.Generator()
    if gen is not None:
        gen.manual_seed(data_seed(seed, epoch))
    if loader.generator is not None and loader.generator is not gen:
        loader.generator.manual_seed(data_seed(seed, epoch) + 1)


def grads_finite(params: Sequence[torch.Tensor], env: DistEnv = SINGLE) -> bool:
    """True when every gradient of ``params`` is finite on every rank."""
    if env.enabled:  # sharded gradients differ per rank: decide together
        return local_grads_finite(params, env)
    grads = [p.grad for p in params if p.grad is not None]
    # one reduction per tensor: a sum is finite iff every element is (barring fp overflow)
    return not grads or bool(torch.isfinite(torch.stack([g.sum() for g in grads])).all())


class StepGuard:
    """One phase's guard against non-finite steps.

    ``run(body, *args)`` zeroes the optimizers' gradients, snapshots the model's buffers, runs ``body()``
    (``body(*args)`` returns False for a step to discard), and on a discarded step zeroes the gradients again
    and restores the buffers. ``total`` and ``in_row`` count discarded steps; :meth:`check` raises
    :class:`NonFiniteError` once ``in_row`` reaches ``max_bad_steps`` (after ``on_stop()``, e.g. a
    checkpoint, whose path the message names).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer | None],
        phase: str,
        max_bad_steps: int,
        env: DistEnv = SINGLE,
    ) -> None:
        self.model, self.phase, self.max_bad_steps, self.env = model, phase, max_bad_steps, env
        self.optimizers = [o for o in optimizers if o is not None]
        self.total, self.in_row = 0, 0

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        # the model's own gradients too: a low-precision parameter is in no optimizer (its fp32
        # master is, see MasterWeights), and a skipped step must not leave its gradient to add up
        self.model.zero_grad(set_to_none=True)

    def backward(
        self,
        loss: torch.Tensor,
        params: Sequence[torch.Tensor],
        scaler: Any = None,
        after_backward: Callable[[], None] | None = None,
    ) -> bool:
        """Backward of ``loss`` when it is finite on every rank; True when the gradients are usable.

        ``after_backward()`` runs before the check (e.g. all-reducing replicated gradients of a
        sharded model). With fp16 loss scaling (an enabled ``scaler``) the scaler's own inf check
        handles overflowing gradients, so only the loss is checked then.
        """
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.env.enabled:
            # one decision for all ranks; a skipped step still runs DDP's backward (the gradients
            # are discarded) so that its pending all-reduce completes everywhere
            if any_rank(not finite, self.env):
                (loss * 0.0).backward()
                return False
        elif not finite:
            return False
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if after_backward is not None:
            after_backward()
        if scaler is not None and scaler.is_enabled():
            return True
        return grads_finite(params, self.env)

    def run(self, body: Callable[..., bool], *args: Any) -> bool:
        """One guarded step, ``body(*args)``; returns whether it was applied."""
        self.zero_grad()
        # a bad batch must not poison running statistics (BatchNorm) either: restored on a skip
        saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        ok = body(*args)
        if ok:
            self.in_row = 0
            return True
        self.zero_grad()
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)
        self.total += 1
        self.in_row += 1
        return False

    def check(self, step: int, on_stop: Callable[[], str | None] | None = None) -> None:
        """Raise :class:`NonFiniteError` when ``max_bad_steps`` steps in a row were discarded."""
        if self.in_row < self.max_bad_steps:
            return
        path = on_stop() if on_stop is not None else None
        where = f"; checkpoint: {path}" if path else ""
        raise NonFiniteError(
            f"{self.phase}: {self.in_row} non-finite steps in a row (loss or gradient), "
            f"the last at step {step}{where}"
        )


LOW_PRECISION = (torch.bfloat16, torch.float16)


class MasterWeights:
    """fp32 master copies of the low-precision (bf16, fp16) parameters an optimizer trains.

    An optimizer stepping bf16 weights directly loses every update smaller than half a unit in
    the last place of the weight (bf16 keeps 8 significant bits: the neighbours of a weight of
    0.02 are 2**-13 ~ 1.2e-4 away, and an Adam update is about lr in size, so at lr 2e-5 it
    rounds back to the old value for every weight but the smallest ones). The
    optimizer is given :attr:`params` instead, in which each bf16/fp16 parameter is replaced by
    an fp32 copy; fp32 and fp64 parameters are their own master, so for an fp32 model
    :attr:`params` is the list it was given and every method below does nothing.

    One step: backward fills the model parameters' gradients (in the model's dtype; the forward
    and backward run in it); :meth:`grads_to_master` moves them, as fp32, to the masters; the
    optimizer (and gradient clipping, and fp16 loss-scale unscaling, which refuses fp16
    gradients) works on the masters; :meth:`to_model` writes the masters back into the model,
    rounded to nearest. The model's weights are therefore always the rounded masters. A sharded
    (FSDP2 DTensor) parameter gets a DTensor master with the same placements.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.model_params = list(params)
        self.pairs: list[tuple[torch.Tensor, nn.Parameter]] = []
        self.params: list[torch.Tensor] = []
        for p in self.model_params:
            if p.dtype in LOW_PRECISION:
                m = nn.Parameter(p.detach().to(torch.float32), requires_grad=p.requires_grad)
                self.pairs.append((p, m))
                self.params.append(m)
            else:
                self.params.append(p)

    @property
    def masters(self) -> list[nn.Parameter]:
        """The fp32 masters of the low-precision parameters, in parameter order."""
        return [m for _, m in self.pairs]

    def grads_to_master(self) -> None:
        """Move each low-precision gradient to its master as fp32 (the model's is dropped)."""
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """Write the masters into the model's parameters, rounded to the parameters' dtype."""
        for p, m in self.pairs:
            p.copy_(m)

    @torch.no_grad()
    def from_model(self) -> None:
        """Set the masters to the model's current values (e.g. weights loaded without masters)."""
        for p, m in self.pairs:
            m.copy_(p)

    def state(self) -> dict[str, torch.Tensor]:
        """``{"master.{i}": whole fp32 tensor}`` (a sharded master is gathered: a collective)."""
        return {f"master.{i}": full_tensor(m).detach() for i, m in enumerate(self.masters)}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """The masters from :meth:`state`'s tensors (re-sharded like the masters); from the
        model's weights when ``tensors`` has none (what was below their precision is lost then)."""
        masters = self.masters
        if not masters or "master.0" not in tensors:
            self.from_model()
            return
        if f"master.{len(masters) - 1}" not in tensors or f"master.{len(masters)}" in tensors:
            raise ValueError(
                f"checkpoint holds a different number of master weights than the model's {len(masters)}"
            )
        for i, m in enumerate(masters):
            m.copy_(reshard_like(tensors[f"master.{i}"], m))


class Progress:
    """A progress bar (tqdm, on stderr) with an ETA, on rank 0 when enabled; every method is a
    no-op otherwise (``progress: false`` in a recipe, and every rank but 0).

    Phases that count their own work report through :meth:`step` (a ``(done, total)`` callback);
    :meth:`counting` wraps a function (e.g. a latency meter) so that each call advances the bar.
    """

    def __init__(
        self, enabled: bool, total: int | None, desc: str, initial: int = 0, env: DistEnv = SINGLE
    ) -> None:
        self.bar = None
        if enabled and env.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)

    def step(self, done: int, total: int) -> None:
        """``(done, total)`` progress of a phase that counts its own work."""
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)

    def counting(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with one step of the bar after each call."""
        if self.bar is None:
            return fn

        def counted(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.update()
            return out

        return counted

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def finish(self) -> None:
        """Close a bar whose total was an upper bound (a search that stopped before its last
        probe): the work is done, so the bar ends full."""
        if self.bar is not None and self.bar.total is not None and self.bar.n < self.bar.total:
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
