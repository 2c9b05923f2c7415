"""Gates: every gate of a model lives in one GateStore.

A GateStore holds ONE flat 1-D ``nn.Parameter`` of logits and a segment table. A segment is a
run of consecutive gates that belong to one prunable structure (a block's inner channels, a
residual stream, the heads of one attention layer, the FFN groups of one layer, ...). Each gate
covers ``group_size`` consecutive units (channels, heads, neurons); the last gate of a segment
may cover fewer when the unit count is not a multiple of the group size.

Because the whole model's gates are one vector, penalties, the latency proxy's expected widths
and the constraint projection are whole-vector operations, never Python loops over modules. Their
formulas live in the ops of :mod:`hawada.ops.gates` (one dispatch point between the torch
reference and the Triton kernels); this module calls them.

Probability (docs/DESIGN.md, invariant 3): ``GateStore.probs()`` is the probability that a gate is
non-zero under the very distribution the training forward samples from:

* ``hard_concrete``: z = clamp(sigmoid((log u - log(1-u) + l + tau log(-gamma/zeta)) / tau)
  * (zeta - gamma) + gamma, 0, 1), so that P(z > 0) = sigmoid(l): the logit is the log-odds of a
  non-zero gate at every temperature.
* ``sigmoid``: deterministic soft mask z = sigmoid(l / tau); "probability" sigmoid(l / tau).
* ``ste``: z ~ Bernoulli(sigmoid(l / tau)) with a straight-through gradient; P = sigmoid(l / tau).

In eval mode every gate is hard: open iff its logit > 0, i.e. iff P(z != 0) > 1/2 under the
distribution the training forward samples from, in every mode (invariant 2).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hawada.core.schema import check_fields, knob
from hawada.errors import InputError
from hawada.ops.gates import (
    GateMode,
    PenaltyTerms,
    SegmentTable,
    gate_penalties,
    gate_probs,
    gate_sample,
    project_gates,
)

KINDS = ("block", "stage", "head", "ffn", "kv_group", "layer")


@dataclass
class GateConfig:
    """How gates are attached and sampled.

    Args:
        mode: ``hard_concrete`` (L0 with stretch + temperature), ``sigmoid`` (deterministic),
            or ``ste`` (Bernoulli samples with straight-through gradient).
        init_logit: initial logit of every gate (> 0: starts open).
        tau: initial temperature; annealed to ``tau_final`` by :meth:`GateStore.anneal`.
        tau_final: final temperature (``None``: keep ``tau``).
        stretch: (gamma, zeta) of the hard-concrete stretch, gamma < 0 < 1 < zeta.
        group_size: units per gate, by kind (adapters supply defaults for missing kinds).
        min_keep: gates the projection keeps open per segment, by kind. A residual stream
            (``stage``) always keeps at least one. A transformer layer's gate (``layer``) is a
            segment of one gate: ``min_keep.layer: 1`` keeps every layer.
        kinds: kinds to gate; ``None`` gates every kind the adapter supports.
        logit_clip: projection clamps logits into [-logit_clip, logit_clip].
    """

    mode: GateMode = "hard_concrete"
    init_logit: float = knob(3.0)
    tau: float = knob(2.0 / 3.0, lo=0.0, lo_open=True)
    tau_final: float | None = knob(None, lo=0.0, lo_open=True)
    stretch: tuple[float, float] = (-0.1, 1.1)
    group_size: dict[str, int] = knob(factory=dict, lo=1)
    min_keep: dict[str, int] = knob(factory=dict, lo=0)
    kinds: tuple[str, ...] | None = None
    logit_clip: float = knob(10.0, lo=0.0, lo_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "gates")
        gamma, zeta = self.stretch
        if not (gamma < 0 and zeta > 1):
            raise InputError(f"gates.stretch: must satisfy gamma < 0 < 1 < zeta, got {tuple(self.stretch)}")

    def wants(self, kind: str) -> bool:
        """True when gates of ``kind`` should be attached."""
        return self.kinds is None or kind in self.kinds

    def group_for(self, kind: str, default: int) -> int:
        return int(self.group_size.get(kind, default))

    def min_keep_for(self, kind: str) -> int:
        k = int(self.min_keep.get(kind, 0))
        return max(k, 1) if kind == "stage" else k


@dataclass(frozen=True)
class Segment:
    """One prunable structure: gates ``[start, start + count)`` of the flat store.

    ``units`` is the number of elements the segment covers (channels, heads, neurons);
    gate ``i`` covers units ``[i * group_size, min((i + 1) * group_size, units))``.
    """

    name: str
    kind: str
    start: int
    count: int
    group_size: int
    layer: int
    units: int
    min_keep: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.count

    def gate_sizes(self) -> list[int]:
        g, n = self.group_size, self.units
        return [min(g, n - i * g) for i in range(self.count)]


class GateStore(nn.Module):
    """All gate logits of one model and their segment table.

    Attributes:
        logits: ``[N]`` parameter, N = total gates.
        segments: list of :class:`Segment` in registration order.
        tau: scalar buffer, the current temperature.
    """

    def __init__(self, config: GateConfig | None = None) -> None:
        super().__init__()
        self.config = config or GateConfig()
        self.logits = nn.Parameter(torch.zeros(0))
        self.segments: list[Segment] = []
        self._by_name: dict[str, Segment] = {}
        self.register_buffer("tau", torch.tensor(float(self.config.tau)))
        self._rebuild_tables(torch.device("cpu"))
        self._mask: torch.Tensor | None = None
        self._unit_masks: dict[str, torch.Tensor] = {}
        self._override: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ registration
    def register(
        self,
        name: str,
        kind: str,
        units: int,
        group_size: int = 1,
        layer: int = -1,
        min_keep: int | None = None,
    ) -> Segment:
        """Add a segment of ``ceil(units / group_size)`` gates; returns it."""
        if name in self._by_name:
            raise ValueError(f"gate segment {name!r} is registered twice")
        if units < 1 or group_size < 1:
            raise ValueError(f"segment {name!r}: units and group_size must be >= 1")
        count = math.ceil(units / group_size)
        mk = self.config.min_keep_for(kind) if min_keep is None else int(min_keep)
        seg = Segment(
            name,
            kind,
            int(self.logits.numel()),
            count,
            int(group_size),
            int(layer),
            int(units),
            min(mk, count),
        )
        with torch.no_grad():
            new = torch.full(
                (count,),
                float(self.config.init_logit),
                device=self.logits.device,
                dtype=self.logits.dtype if self.logits.numel() else torch.float32,
            )
            self.logits = nn.Parameter(torch.cat([self.logits.detach(), new]))
        self.segments.append(seg)
        self._by_name[name] = seg
        self._rebuild_tables(self.logits.device)
        return seg

    def _rebuild_tables(self, device: torch.device) -> None:
        segs = self.segments
        seg_id = [i for i, s in enumerate(segs) for _ in range(s.count)]
        sizes = [sz for s in segs for sz in s.gate_sizes()]

        def mk(xs, dt):
            return torch.tensor(xs, dtype=dt, device=device)

        self.register_buffer("seg_id", mk(seg_id, torch.long), persistent=False)
        self.register_buffer("gate_size", mk(sizes, torch.float32), persistent=False)
        self.register_buffer("seg_start", mk([s.start for s in segs], torch.long), persistent=False)
        self.register_buffer("seg_units", mk([s.units for s in segs], torch.float32), persistent=False)
        self.register_buffer("seg_min_keep", mk([s.min_keep for s in segs], torch.long), persistent=False)
        if not hasattr(self, "seg_cost") or self.seg_cost.numel() != len(segs):
            self.register_buffer("seg_cost", torch.ones(len(segs), device=device), persistent=False)

    def segment(self, name: str) -> Segment:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no gate segment named {name!r}") from None

    def __len__(self) -> int:
        return int(self.logits.numel())

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    def set_segment_costs(self, costs: torch.Tensor) -> None:
        """Per-unit cost of each segment, ``[S]``, used by the cost-weighted L0 penalty."""
        if costs.shape != (self.num_segments,):
            raise ValueError(
                f"segment costs must have shape ({self.num_segments},), got {tuple(costs.shape)}"
            )
        self.seg_cost = costs.detach().to(self.logits.device, torch.float32)

    @property
    def table(self) -> SegmentTable:
        """The segment table buffers, as the store ops take them."""
        return SegmentTable(self.seg_id, self.gate_size, self.seg_start, self.seg_units, self.seg_min_keep)

    @contextlib.contextmanager
    def logits_as(self, logits: torch.Tensor) -> Iterator[None]:
        """Inside the block the store's logits hold ``logits`` (``[N]``, copied without autograd);
        on exit, exception or not, they hold their previous values again.

        ``store.logits_as(store.logits)`` makes the block a scratch area: whatever it writes into
        the logits is undone on exit.
        """
        saved = self.logits.detach().clone()
        with torch.no_grad():
            self.logits.copy_(logits)
        try:
            yield
        finally:
            with torch.no_grad():
                self.logits.copy_(saved)

    # ------------------------------------------------------------------ distribution
    def probs(self) -> torch.Tensor:
        """``[N]`` probability each gate is non-zero under the training distribution."""
        return gate_probs(self.logits, self.tau, self.config.mode, self.config.stretch)

    def hard_mask(self) -> torch.Tensor:
        """``[N]`` eval-mode gates: 1.0 iff logit > 0, i.e. iff :meth:`probs` > 1/2."""
        return (self.logits.detach() > 0).to(self.logits.dtype)

    def sample(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``[N]`` gate values for one training forward (differentiable w.r.t. logits).

        ``noise``: optional ``[N]`` uniform(0, 1) draws, for reproducible tests; without it the
        op draws ``torch.rand_like(logits)`` (not for ``sigmoid``, which draws nothing).
        """
        return gate_sample(self.logits, noise, self.tau, self.config.mode, self.config.stretch)

    def refresh(self) -> None:
        """Forget this forward's masks: the next :meth:`unit_mask` samples anew."""
        self._mask = None
        self._unit_masks = {}

    def gate_mask(self) -> torch.Tensor:
        """``[N]`` gate values of the current forward (sampled in train mode, hard in eval)."""
        if self._mask is None:
            self._mask = self.sample() if self.training else self.hard_mask()
        return self._mask

    def unit_mask(self, name: str) -> torch.Tensor:
        """``[units]`` mask of one segment for the current forward, gates expanded to units."""
        if self._override is not None and name in self._override:
            return self._override[name]
        m = self._unit_masks.get(name)
        if m is None:
            seg = self._by_name[name]
            gm = self.gate_mask()[seg.start : seg.stop]
            m = expand_to_units(gm, seg)
            self._unit_masks[name] = m
        return m

    @contextlib.contextmanager
    def override(self, unit_masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Force the unit masks of some segments (e.g. a rounded keep set) inside the block."""
        prev = self._override
        self._override = {**(prev or {}), **{k: v.to(self.logits.device) for k, v in unit_masks.items()}}
        self.refresh()
        try:
            yield
        finally:
            self._override = prev
            self.refresh()

    # ------------------------------------------------------------------ widths
    def segment_sum(self, per_gate: torch.Tensor) -> torch.Tensor:
        """``[N] -> [S]``: sum a per-gate quantity within each segment."""
        out = per_gate.new_zeros(self.num_segments)
        return out.index_add(0, self.seg_id, per_gate)

    def expected_units(self) -> torch.Tensor:
        """``[S]`` expected kept units per segment (differentiable)."""
        return penalty_terms(self, PenaltyWeights()).expected_units

    def open_units(self) -> torch.Tensor:
        """``[S]`` units kept in eval mode (gates with logit > 0)."""
        return self.segment_sum(self.hard_mask() * self.gate_size)

    def anneal(self, step: int, total_steps: int) -> None:
        """Exponential temperature schedule from ``config.tau`` to ``config.tau_final``."""
        t0, t1 = self.config.tau, self.config.tau_final
        if t1 is None or total_steps <= 0:
            return
        frac = min(max(step / total_steps, 0.0), 1.0)
        self.tau.fill_(t0 * (t1 / t0) ** frac)

    def summary(self) -> list[dict]:
        """Per segment: name, kind, layer, units, open units, expected units."""
        with torch.no_grad():
            open_u = self.open_units().tolist()
            exp_u = self.expected_units().tolist()
        return [
            {
                "name": s.name,
                "kind": s.kind,
                "layer": s.layer,
                "units": s.units,
                "open": int(round(o)),
                "expected": round(e, 2),
            }
            for s, o, e in zip(self.segments, open_u, exp_u)
        ]


def expand_to_units(gate_values: torch.Tensor, seg: Segment) -> torch.Tensor:
    """``[count] -> [units]``: repeat each gate over the units it covers."""
    g = seg.group_size
    if g == 1:
        return gate_values
    full = gate_values.repeat_interleave(g)
    return full[: seg.units]


# ---------------------------------------------------------------------- penalties
@dataclass
class PenaltyWeights:
    """Weights of the gate penalties (all from the recipe).

    ``l0``: expected kept fraction (cost-weighted when ``cost_weighted``); ``floor``: squared
    shortfall below ``floor_frac`` of each segment's units; ``bimodal``: mean p(1 - p).
    """

    l0: float = knob(0.0, lo=0.0)
    floor: float = knob(1.0, lo=0.0)
    floor_frac: float = knob(0.05, lo=0.0, hi=1.0)
    bimodal: float = knob(0.0, lo=0.0)
    cost_weighted: bool = True

    def __post_init__(self) -> None:
        check_fields(self, "penalties")


def penalty_terms(store: GateStore, weights: PenaltyWeights) -> PenaltyTerms:
    """The weighted penalty total, its terms (scalars) and ``expected_units [S]``, from one op call.

    Terms: ``l0`` expected fraction of (cost-weighted) units kept, in [0, 1]; ``floor`` mean over
    segments of relu(floor_frac * units - E[kept]) ** 2 / units ** 2; ``bimodal`` mean p (1 - p).
    A store without gates has no terms: every output is zero (``expected_units`` is ``[0]``).
    """
    if not store.num_segments:
        zero = store.logits.new_zeros(())
        return PenaltyTerms(zero, zero, zero, zero, store.logits.new_zeros(0))
    cfg = store.config
    return gate_penalties(
        store.logits, store.table, store.seg_cost, store.tau, weights, cfg.mode, cfg.stretch
    )


def combined_penalty(store: GateStore, weights: PenaltyWeights) -> torch.Tensor:
    """Scalar: weighted sum of the penalties, all from one evaluation of the probabilities."""
    return penalty_terms(store, weights).total


@torch.no_grad()
def project_gates_into_constraints(store: GateStore, margin: float = 0.05) -> None:
    """In place: clamp logits into ``[-logit_clip, logit_clip]`` and raise the ``min_keep``
    largest gates of each segment to ``>= margin`` (open). Whole store at once, no host sync."""
    project_gates(store.logits, store.table, store.seg_min_keep, store.config.logit_clip, margin)
