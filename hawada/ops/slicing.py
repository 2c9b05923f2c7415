"""``slice_many``: gather the kept rows/columns of many tensors in one call.

The compiled extension (``hawada._C``: CPU threads over tensors and rows, or one CUDA launch over
a flattened work list) runs it when it is loaded (:mod:`hawada._ext`; ``HAWADA_EXT`` and
``HAWADA_BACKEND=torch`` switch it off), and ``slice_many_ref`` (one ``index_select`` per tensor
and dim) otherwise. Both give bitwise-equal results (invariant 5). Not a ``torch.library`` op:
export-time copies without autograd. Importing this module never loads the extension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hawada import _ext

Index = torch.Tensor | None

_INDEX_DTYPES = (torch.int64, torch.int32)


class SliceError(ValueError):
    """Arguments ``slice_many`` cannot gather from (dtype, shape, device or index range)."""


def _check_index(idx: Index, size: int, i: int, what: str) -> int:
    """Number of kept entries along a dim of ``size`` (the full size for None)."""
    if idx is None:
        return size
    if idx.dtype not in _INDEX_DTYPES:
        raise SliceError(f"slice_many: tensor {i} {what} indices must be int64 or int32, got {idx.dtype}")
    if idx.dim() != 1:
        raise SliceError(f"slice_many: tensor {i} {what} indices must be 1-D, got {idx.dim()}-D")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise SliceError(f"slice_many: tensor {i} {what} index {bad} out of range [0, {size})")
    return int(idx.numel())


def slice_shape(src: torch.Tensor, rows: Index, cols: Index, i: int = 0) -> list[int]:
    """Shape of ``src[rows][:, cols]`` (``rows`` on dim 0, ``cols`` on dim 1; None keeps all), checked."""
    if src.dim() == 0:
        raise SliceError(f"slice_many: tensor {i} is 0-d; only tensors with at least one dim can be sliced")
    if src.dim() == 1 and cols is not None:
        raise SliceError(f"slice_many: tensor {i} is 1-D; column indices need at least 2 dims")
    shape = list(src.shape)
    shape[0] = _check_index(rows, shape[0], i, "row")
    if src.dim() >= 2:
        shape[1] = _check_index(cols, shape[1], i, "column")
    return shape


def _check_lists(srcs: Sequence, rows: Sequence, cols: Sequence, out: Sequence | None) -> None:
    n = len(srcs)
    if len(rows) != n or len(cols) != n or (out is not None and len(out) != n):
        raise SliceError(
            f"slice_many: srcs, rows, cols{', out' if out is not None else ''} must have the same length, "
            f"got {n}, {len(rows)}, {len(cols)}{f', {len(out)}' if out is not None else ''}"
        )


def slice_many_ref(
    srcs: Sequence[torch.Tensor],
    rows: Sequence[Index],
    cols: Sequence[Index],
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Torch reference of :func:`slice_many`: ``index_select`` per tensor and dim.

    ``srcs[i]``: ``[R, C, *rest]`` (or ``[R]``); ``rows[i]``: ``[R']`` or None; ``cols[i]``:
    ``[C']`` or None; returns (or fills ``out`` with) contiguous ``[R', C', *rest]`` tensors.
    """
    _check_lists(srcs, rows, cols, out)
    res = []
    for i, (src, r, c) in enumerate(zip(srcs, rows, cols)):
        shape = slice_shape(src, r, c, i)
        t = src.detach()
        if r is not None:
            t = t.index_select(0, r.to(t.device, torch.long))
        if c is not None:
            t = t.index_select(1, c.to(t.device, torch.long))
        if out is None:
            res.append(t.contiguous() if (r is not None or c is not None) else t.clone())
        else:
            dst = out[i]
            if list(dst.shape) != shape or dst.dtype != src.dtype or dst.device != src.device:
                raise SliceError(
                    f"slice_many: tensor {i} destination {tuple(dst.shape)} {dst.dtype} on {dst.device} "
                    f"!= expected {tuple(shape)} {src.dtype} on {src.device}"
                )
            dst.copy_(t)
            res.append(dst)
    return res


def uses_extension() -> bool:
    """True when the compiled extension is loaded: :func:`slice_many` then runs it for CPU tensors
    (and CUDA tensors when it was built with CUDA). Loads it on first call."""
    return _ext.available()


def slice_many(
    srcs: Sequence[torch.Tensor],
    rows: Sequence[Index],
    cols: Sequence[Index],
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``[srcs[i][rows[i]][:, cols[i]] for i]`` as new contiguous tensors (or into ``out``).

    Shapes as in :func:`slice_many_ref`. Uses the compiled extension when loaded and every
    tensor is on one CPU or CUDA device; otherwise the reference. Raises :class:`SliceError`
    (a ValueError) on bad input: index dtype not int32/int64, index out of range, mismatched
    lengths, shapes, dtypes or devices. Nothing is written before every job has been checked.
    """
    _check_lists(srcs, rows, cols, out)
    mod = _ext.load()
    if mod is None or not srcs:
        return slice_many_ref(srcs, rows, cols, out)
    dev = srcs[0].device
    if dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not mod.has_cuda()):
        return slice_many_ref(srcs, rows, cols, out)
    if out is None:
        out = [
            torch.empty(slice_shape(s, r, c, i), dtype=s.dtype, device=s.device)
            for i, (s, r, c) in enumerate(zip(srcs, rows, cols))
        ]
    try:
        mod.slice_many([s.detach() for s in srcs], list(rows), list(cols), [o.detach() for o in out])
    except ValueError as e:  # the extension checks everything before writing; one-line error
        raise SliceError(str(e).splitlines()[0]) from None
    return list(out)
