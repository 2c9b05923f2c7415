"""Batched slicing: record the export's slicing jobs and fill them with one ``slice_many`` call.

``batched_slicing()`` is the context :func:`hawada.core.export.export` runs an adapter's
``export_pruned`` in: inside it, ``slice_linear`` / ``slice_conv2d`` / ``slice_batchnorm`` /
``slice_embedding`` allocate the new module's tensors and record one job each; one
:func:`hawada.ops.slice_many` call fills them all when the context exits. Until then those
tensors hold uninitialised memory: shapes may be read, values may not (call
:meth:`SliceBatch.flush` first). ``slice_tensor`` always returns its values at once.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from hawada import ops
from hawada.ops.slicing import Index, SliceError, slice_shape, uses_extension


class SliceBatch:
    """Recorded jobs ``(dst, src, rows, cols)``; :meth:`flush` fills every ``dst`` at once."""

    def __init__(self) -> None:
        self.jobs: list[tuple[torch.Tensor, torch.Tensor, Index, Index]] = []

    def add(self, dst: torch.Tensor, src: torch.Tensor, rows: Index, cols: Index) -> None:
        """Record ``dst <- src[rows][:, cols]``; ``dst`` must already have the result's shape."""
        shape = slice_shape(src, rows, cols, len(self.jobs))
        if list(dst.shape) != shape:
            raise SliceError(f"slice batch: destination shape {tuple(dst.shape)} != {tuple(shape)}")
        self.jobs.append((dst.detach(), src.detach(), rows, cols))

    def flush(self) -> None:
        """Fill every recorded destination (one ``slice_many`` call per device) and forget the jobs."""
        jobs, self.jobs = self.jobs, []
        by_dev: dict[torch.device, list] = {}
        for j in jobs:
            by_dev.setdefault(j[1].device, []).append(j)
        for group in by_dev.values():
            dsts, srcs, rows, cols = (list(x) for x in zip(*group))
            ops.slice_many(srcs, rows, cols, out=dsts)


_local = threading.local()


def current_batch() -> SliceBatch | None:
    """The innermost active :func:`batched_slicing` batch of this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def batched_slicing(enabled: bool | None = None) -> Iterator[SliceBatch | None]:
    """Defer the slice_* module primitives' copies to one :func:`hawada.ops.slice_many` call at exit.

    ``enabled``: None batches only when the compiled extension is loaded (the Python path
    then stays exactly the per-tensor one); True batches with whichever backend
    ``slice_many`` picks; False does nothing. On an exception the recorded jobs are dropped.
    """
    if enabled is None:
        enabled = uses_extension()
    if not enabled:
        yield None
        return
    batch = SliceBatch()
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(batch)
    try:
        yield batch
    except BaseException:
        stack.pop()
        batch.jobs.clear()
        raise
    stack.pop()
    batch.flush()
