"""Fused ops: one entry point per op, with the torch reference as the always-available path.

``HAWADA_BACKEND`` (``auto`` | ``triton`` | ``torch``) selects the implementation (see
:mod:`hawada.ops.backend`). The training ops are ``torch.library`` custom ops (``hawada::*``) with a
fake (meta) implementation and an autograd formula, so ``torch.compile`` traces through them.
Triton is imported only when a Triton kernel is about to run. ``slice_many`` (export-time weight
slicing, no autograd) runs the compiled extension when it is loaded (:mod:`hawada.ops.slicing`);
importing this package never loads it.
"""

from hawada.ops.backend import (
    BACKENDS,
    BackendUnavailableError,
    backend_setting,
    resolve_backend,
    triton_import_error,
    use_backend,
)
from hawada.ops.gated_linear import gated_linear, gated_linear_backward_ref, gated_linear_ref
from hawada.ops.gates import (
    GATE_MODES,
    GateMode,
    PenaltyTerms,
    SegmentTable,
    gate_penalties,
    gate_penalties_ref,
    gate_probs,
    gate_probs_ref,
    gate_sample,
    gate_sample_ref,
    project_gates,
    project_gates_ref,
)
from hawada.ops.slicing import SliceError, slice_many, slice_many_ref

__all__ = [
    "BACKENDS",
    "GATE_MODES",
    "BackendUnavailableError",
    "GateMode",
    "PenaltyTerms",
    "SegmentTable",
    "SliceError",
    "backend_setting",
    "gate_penalties",
    "gate_penalties_ref",
    "gate_probs",
    "gate_probs_ref",
    "gate_sample",
    "gate_sample_ref",
    "gated_linear",
    "gated_linear_backward_ref",
    "gated_linear_ref",
    "project_gates",
    "project_gates_ref",
    "resolve_backend",
    "slice_many",
    "slice_many_ref",
    "triton_import_error",
    "use_backend",
]
