"""Export: keep sets from gates, slicing primitives, and the checked family-agnostic export.

The family-specific rebuild is done by the adapter object that ``attach`` stored on the
gated model (``model._hawada_adapter``); this module never imports an adapter.
"""

from __future__ import annotations

import copy
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import skip_init

from hawada.core.gates import GateStore
from hawada.core.hooks import ADAPTER_ATTR, gates_of, strip_gate_hooks
from hawada.core.protocol import AdapterLike
from hawada.core.slicing import batched_slicing, current_batch
from hawada.errors import InputError

RoundMode = Literal["nearest", "floor", "ceil"]
ROUND_MODES = typing.get_args(RoundMode)


class ExportError(RuntimeError):
    """An export that cannot be made, or that would break invariant 2 (docs/DESIGN.md)."""


class ExportRequestError(ExportError, InputError):
    """An export that cannot be made as asked (the model, the policy or the gates rule it out):
    bad input, where a failed check of the exported model is a bug."""


@dataclass(frozen=True)
class Rounding:
    """Round each segment's kept unit count to a multiple the device runs fast.

    ``multiple``: units are kept in multiples of this; the segment's full size always counts
    as allowed, and no count is ever rounded above it. ``mode``: ``nearest`` (the nearer
    allowed count, ties up: 12 -> 16 and 20 -> 24 for a multiple of 8), ``floor`` or ``ceil``.
    ``min_keep_ratio``: never keep fewer than this fraction of the units. A segment with no
    open unit stays closed unless ``min_keep_ratio`` > 0; an open segment never rounds down to
    zero. A segment no larger than ``multiple`` keeps its count unrounded.
    """

    multiple: int = 1
    mode: RoundMode = "nearest"
    min_keep_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.multiple < 1:
            raise InputError(f"rounding multiple must be >= 1, got {self.multiple}")
        if self.mode not in ROUND_MODES:
            raise InputError(f"rounding mode {self.mode!r} is not one of {ROUND_MODES}")
        if not 0.0 <= self.min_keep_ratio <= 1.0:
            raise InputError(f"min_keep_ratio must be in [0, 1], got {self.min_keep_ratio}")

    def apply(self, open_units: int, units: int) -> int:
        """The kept count of a segment of ``units`` units with ``open_units`` open ones."""
        m, o = self.multiple, int(open_units)
        if m >= units:
            # The only counts such a segment has at this multiple are 0 and its full size: rounding
            # would close it or reopen every unit (a multiple of 64 on 4 query slots or 8 KV groups
            # keeps them all), undoing what the gates chose where the multiple cannot pay off.
            k = o
        elif o > 0:
            lo = o if o == units else o // m * m  # the full size is allowed: floor keeps it
            # the next allowed count up is the next multiple, or the full size when that is past
            # it: never round above the segment (there is no unit to add), and the full size is
            # as fast a shape as any multiple for the device (it is the original model's)
            hi = o if o == lo else min(lo + m, units)
            if self.mode == "floor":
                k = lo
            elif self.mode == "ceil":
                k = hi
            else:  # nearest, half up: Python's round() rounds half to even (20/8 -> 16, not 24)
                k = hi if o - lo >= hi - o else lo
            k = max(k, m)  # an open segment never rounds down to zero
        else:
            k = 0
        k = max(k, math.ceil(self.min_keep_ratio * units))
        return min(k, units)


@dataclass
class ExportPolicy:
    """How gates become a slim model.

    The default applies no rounding and keeps exactly the units whose gates are open in eval
    mode. ``rounding`` applies to every kind but ``layer`` unless ``per_kind`` names one. ``check``: verify
    the slim model against the gated model on a probe batch (invariant 2) and refuse to
    return a model that breaks it, at relative error ``tolerance`` for a model computing in
    fp32 (or fp64); a bf16/fp16 model is held to :func:`export_tolerance` of its dtype (never
    below ``tolerance``). ``counts``: kept unit count per segment name, overriding the gates and
    the rounding (e.g. a uniform layout).
    """

    rounding: Rounding | None = None
    per_kind: dict[str, Rounding] = field(default_factory=dict)
    check: bool = True
    tolerance: float = 1e-4
    counts: dict[str, int] = field(default_factory=dict)

    def rounding_for(self, kind: str) -> Rounding | None:
        """The rounding of ``kind``'s segments. A whole-layer gate (``layer``, one unit) is rounded
        only when ``per_kind`` names it: ``rounding`` (with a ``min_keep_ratio``) would reopen it."""
        if kind == "layer":
            return self.per_kind.get(kind)
        return self.per_kind.get(kind, self.rounding)


# ---------------------------------------------------------------------- keep sets
def keep_group_indices_from_gate(logits: torch.Tensor, k: int) -> torch.Tensor:
    """``[G] -> [k]``: indices of the ``k`` largest gate logits, ascending (ties: lower index)."""
    k = int(k)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    order = torch.sort(logits.detach(), descending=True, stable=True).indices
    return order[:k].sort().values


def keep_element_indices_from_gate(logits: torch.Tensor, group_size: int, units: int, k: int) -> torch.Tensor:
    """``[G] -> [k]``: the ``k`` kept unit indices when each gate covers ``group_size`` units.

    Units inherit their gate's logit; whole groups are taken in logit order, and a rounded
    count that splits a group keeps that group's lowest units.
    """
    unit_logits = logits.detach().repeat_interleave(group_size)[:units]
    return keep_group_indices_from_gate(unit_logits, k)


def keep_counts(store: GateStore, policy: ExportPolicy | None = None) -> dict[str, int]:
    """Kept unit count per segment under ``policy``."""
    policy = policy or ExportPolicy()
    open_u = [int(round(v)) for v in store.open_units().tolist()]
    out = {}
    for seg, o in zip(store.segments, open_u):
        r = policy.rounding_for(seg.kind)
        out[seg.name] = o if r is None else r.apply(o, seg.units)
        if seg.name in policy.counts:
            k = int(policy.counts[seg.name])
            if not 0 <= k <= seg.units:
                raise ExportRequestError(
                    f"export count {k} for segment {seg.name!r} is outside [0, {seg.units}]"
                )
            out[seg.name] = k
    # A transformer needs one layer (docs/DESIGN.md, "Layer gates"): when the gates close every
    # layer and no count says so, the layer with the highest logit stays (penalties that close
    # every gate they may would otherwise leave a run nothing to export).
    layers = [s for s in store.segments if s.kind == "layer"]
    if layers and not any(out[s.name] for s in layers) and not any(s.name in policy.counts for s in layers):
        lg = store.logits.detach()
        best = max(layers, key=lambda s: float(lg[s.start : s.stop].max()))
        out[best.name] = best.units
    return out


def keep_indices(store: GateStore, policy: ExportPolicy | None = None) -> dict[str, torch.Tensor]:
    """Kept unit indices (ascending, long, on CPU) per segment under ``policy``."""
    counts = keep_counts(store, policy)
    lg = store.logits.detach().cpu()
    return {
        s.name: keep_element_indices_from_gate(lg[s.start : s.stop], s.group_size, s.units, counts[s.name])
        for s in store.segments
    }


def unit_masks_from_keep(store: GateStore, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: [units] float mask}`` with ones at the kept indices."""
    out = {}
    for s in store.segments:
        m = torch.zeros(s.units, device=store.logits.device, dtype=store.logits.dtype)
        m[keep[s.name].to(m.device)] = 1.0
        out[s.name] = m
    return out


def kept_gate_mass(store: GateStore, keep: dict[str, torch.Tensor]) -> float:
    """Sum over kept units of their gate probability, over the whole store's probability mass."""
    with torch.no_grad():
        p = store.probs().detach().cpu()
    total, kept = 0.0, 0.0
    for s in store.segments:
        unit_p = p[s.start : s.stop].repeat_interleave(s.group_size)[: s.units]
        total += float(unit_p.sum())
        kept += float(unit_p[keep[s.name]].sum())
    return kept / max(total, 1e-12)


# ---------------------------------------------------------------------- slicing primitives
def _idx(idx: torch.Tensor | None, size: int, what: str) -> torch.Tensor | None:
    if idx is None:
        return None
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what} indices must be int64 or int32, got {idx.dtype}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise IndexError(f"{what} indices out of range [0, {size})")
    return idx.long()


def slice_tensor(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    """A new contiguous tensor with ``t``'s entries at ``idx`` along ``dim``."""
    idx = _idx(idx, t.shape[dim], "slice")
    if idx is None:
        return t.detach().clone()
    return t.detach().index_select(dim, idx.to(t.device)).contiguous()


def slice_linear(
    lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` keeping output rows ``out_idx`` and input columns ``in_idx``.

    Inside :func:`~hawada.core.slicing.batched_slicing` the new weights are filled when the
    context exits (shapes are final at once)."""
    batch = current_batch()
    if batch is not None:
        o, i = _idx(out_idx, lin.out_features, "slice"), _idx(in_idx, lin.in_features, "slice")
        n_out = lin.out_features if o is None else o.numel()
        n_in = lin.in_features if i is None else i.numel()
        w = lin.weight
        # skip_init: the values are about to be overwritten, so no random init of big matrices.
        new = skip_init(nn.Linear, n_in, n_out, bias=lin.bias is not None, device=w.device, dtype=w.dtype)
        batch.add(new.weight, w, o, i)
        if lin.bias is not None:
            batch.add(new.bias, lin.bias, o, None)
        new.train(lin.training)
        return new
    w = slice_tensor(slice_tensor(lin.weight, 0, out_idx), 1, in_idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(slice_tensor(lin.bias, 0, out_idx))
    new.train(lin.training)
    return new


def slice_conv2d(
    conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None
) -> nn.Conv2d:
    """A new ``nn.Conv2d`` keeping output channels ``out_idx`` and input channels ``in_idx``."""
    if conv.groups != 1:
        raise ExportRequestError(f"slicing grouped convolutions (groups={conv.groups}) is not supported")
    batch = current_batch()
    if batch is not None:
        o = _idx(out_idx, conv.out_channels, "slice")
        i = _idx(in_idx, conv.in_channels, "slice")
        w = conv.weight
        new = skip_init(
            nn.Conv2d,
            conv.in_channels if i is None else i.numel(),
            conv.out_channels if o is None else o.numel(),
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            1,
            conv.bias is not None,
            conv.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        batch.add(new.weight, w, o, i)
        if conv.bias is not None:
            batch.add(new.bias, conv.bias, o, None)
        new.train(conv.training)
        return new
    w = slice_tensor(slice_tensor(conv.weight, 0, out_idx), 1, in_idx)
    new = nn.Conv2d(
        w.shape[1],
        w.shape[0],
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        1,
        conv.bias is not None,
        conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(w)
        if conv.bias is not None:
            new.bias.copy_(slice_tensor(conv.bias, 0, out_idx))
    new.train(conv.training)
    return new


def slice_batchnorm(
    bn: nn.modules.batchnorm._BatchNorm, idx: torch.Tensor | None
) -> nn.modules.batchnorm._BatchNorm:
    """A new BatchNorm of the same class keeping channels ``idx``."""
    n = bn.num_features if idx is None else int(idx.numel())
    new = type(bn)(n, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = new.to(device=bn.weight.device if bn.affine else bn.running_mean.device)
    batch = current_batch()
    if batch is not None:
        k = _idx(idx, bn.num_features, "slice")
        if bn.affine:
            batch.add(new.weight, bn.weight, k, None)
            batch.add(new.bias, bn.bias, k, None)
        if bn.track_running_stats:
            batch.add(new.running_mean, bn.running_mean, k, None)
            batch.add(new.running_var, bn.running_var, k, None)
            with torch.no_grad():
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        new.train(bn.training)
        return new
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(slice_tensor(bn.weight, 0, idx))
            new.bias.copy_(slice_tensor(bn.bias, 0, idx))
        if bn.track_running_stats:
            new.running_mean.copy_(slice_tensor(bn.running_mean, 0, idx))
            new.running_var.copy_(slice_tensor(bn.running_var, 0, idx))
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def slice_embedding(emb: nn.Embedding, dim_idx: torch.Tensor | None) -> nn.Embedding:
    """A new ``nn.Embedding`` keeping embedding dimensions ``dim_idx``."""
    batch = current_batch()
    if batch is not None:
        k = _idx(dim_idx, emb.embedding_dim, "slice")
        w = emb.weight
        n = emb.embedding_dim if k is None else k.numel()
        new = skip_init(
            nn.Embedding, w.shape[0], n, padding_idx=emb.padding_idx, device=w.device, dtype=w.dtype
        )
        batch.add(new.weight, w, None, k)
        return new
    w = slice_tensor(emb.weight, 1, dim_idx)
    new = nn.Embedding(w.shape[0], w.shape[1], padding_idx=emb.padding_idx, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
    return new


# ---------------------------------------------------------------------- checked export
def compute_dtype(model: nn.Module) -> torch.dtype:
    """The least precise floating dtype among ``model``'s parameters (fp32 when it has none).

    A bf16 model with fp32 gate logits computes in bf16: that is the dtype its latency is
    timed in and the precision its outputs are checked to.
    """
    dts = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return max(dts, key=lambda dt: torch.finfo(dt).eps, default=torch.float32)


# Headroom of the low-precision export check over eps * sqrt(layers) (see export_tolerance).
LOW_PRECISION_HEADROOM = 4.0


def export_tolerance(dtype: torch.dtype, layers: int = 1, fp32: float = 1e-4) -> float:
    """The relative error the export check allows a model that computes in ``dtype``.

    fp32 and fp64: ``fp32``. Slicing changes no value: the slim model computes the same sums as
    the gated one without the zeroed terms, and a changed summation order moves fp32 outputs by
    ~1e-6 at most (at most 7e-7 measured on 2-4 layer LLaMA configs up to hidden size 512).

    bf16 and fp16: both models round at the same places, but a matmul over the kept features and
    one over all of them (zeros in between) may accumulate in another order (kernels block and
    split by shape), so an element can round to its neighbour; from there the two forwards
    round independently. Their difference is then at most about sqrt(2) times the rounding
    error of one low-precision forward against exact arithmetic, which grows like the square
    root of the depth (each layer adds an independent error of a few roundings of relative size
    eps/2): measured as the same weights run in the dtype and in fp32, it is 0.31-0.54
    ``eps * sqrt(layers)`` on random LLaMA, Qwen2 and BERT configs of 2 to 16 layers (bf16 and
    fp16). The bound is :data:`LOW_PRECISION_HEADROOM` ``* eps * sqrt(layers)``: about 5x the
    largest difference two such forwards can show, for trained weights whose gain is larger than
    random ones'. A wrong slice moves the outputs by O(1) and stays far above it.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return fp32
    bound = LOW_PRECISION_HEADROOM * torch.finfo(dtype).eps * math.sqrt(max(int(layers), 1))
    return max(fp32, bound)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def adapter_of(model: nn.Module) -> AdapterLike:
    """The adapter object ``attach`` stored on a gated model."""
    ad = getattr(model, ADAPTER_ATTR, None)
    if ad is None:
        raise ExportRequestError("model has no gates: call hawada.attach(model) first")
    return ad


def store_of(model: nn.Module) -> GateStore:
    """The GateStore ``attach`` put on a gated model; raises :class:`ExportError` without one."""
    store = gates_of(model)
    if store is None:
        raise ExportRequestError("model has no gates: call hawada.attach(model) first")
    return store


def export(gated: nn.Module, policy: ExportPolicy | None = None, example_inputs=None) -> nn.Module:
    """A new, physically smaller plain model; ``gated`` is left untouched.

    With ``policy.check`` the slim model's outputs are compared with the eval-mode gated
    model's (gates forced to the exported keep set) on ``example_inputs`` (the adapter's
    probe batch when None); an export that differs by more than ``policy.tolerance`` relative
    error raises :class:`ExportError` instead of being returned.
    """
    policy = policy or ExportPolicy()
    adapter, store = adapter_of(gated), store_of(gated)
    keep = keep_indices(store, policy)
    for seg in store.segments:
        if seg.kind == "stage" and keep[seg.name].numel() == 0:
            raise ExportRequestError(
                f"residual stream {seg.name!r} has every channel closed; a model without it "
                "cannot be exported (keep at least one gate of each stage open)"
            )
    # One batched slice_many call fills every sliced weight when the extension is loaded.
    with batched_slicing():
        slim = adapter.export_pruned(gated, keep)
    if policy.check:
        check_export(gated, slim, keep, example_inputs, policy.tolerance)
    return slim


def export_keepall(gated: nn.Module) -> nn.Module:
    """The original architecture without gates (a new model)."""
    return adapter_of(gated).export_keepall(gated)


@torch.no_grad()
def check_export(
    gated: nn.Module,
    slim: nn.Module,
    keep: dict[str, torch.Tensor],
    example_inputs=None,
    tolerance: float = 1e-4,
) -> float:
    """Relative error of ``slim`` against ``gated`` in eval mode with gates forced to ``keep``.

    Both run in their own dtype, which must be the same (an export keeps the gated model's);
    the bound is ``export_tolerance(dtype, layers, tolerance)`` with ``layers`` the number of
    layers the gates sit in. Raises :class:`ExportError` above it; returns the error otherwise.
    """
    adapter, store = adapter_of(gated), store_of(gated)
    dtype = compute_dtype(slim)
    if compute_dtype(gated) != dtype:
        raise ExportError(
            f"the slim model computes in {dtype} but the gated model in {compute_dtype(gated)}: "
            "the export check compares the two in one dtype"
        )
    bound = export_tolerance(dtype, len({s.layer for s in store.segments}), tolerance)
    if example_inputs is None:
        example_inputs = adapter.example_inputs(gated)
    was_g, was_s = gated.training, slim.training
    gated.eval()
    slim.eval()
    try:
        with store.override(unit_masks_from_keep(store, keep)):
            ref = adapter.check_output(gated, example_inputs)
        out = adapter.check_output(slim, example_inputs)
    finally:
        gated.train(was_g)
        slim.train(was_s)
    if out.shape != ref.shape:
        raise ExportError(
            f"exported model output shape {tuple(out.shape)} != gated model's {tuple(ref.shape)}"
        )
    err = relative_error(out, ref)
    if not err <= bound:
        raise ExportError(
            f"exported model differs from the gated model: relative error {err:.3g} > {bound:g} ({dtype})"
        )
    return err


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clone_without_gates(model: nn.Module) -> nn.Module:
    """Deep copy of ``model`` (gated or not) with store, hooks and adapter reference removed."""
    store = gates_of(model)
    if store is not None:
        store.refresh()  # cached masks of a training forward are not graph leaves
    new = copy.deepcopy(model)
    strip_gate_hooks(new)
    return new
