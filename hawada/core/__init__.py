"""Family-agnostic engine. Never imports an adapter."""

from hawada.core.distill import KDConfig, kd_loss, mse_reg
from hawada.core.export import (
    ExportPolicy,
    Rounding,
    keep_element_indices_from_gate,
    keep_group_indices_from_gate,
    slice_conv2d,
    slice_embedding,
    slice_linear,
)
from hawada.core.finetune import FinetuneConfig, finetune_student
from hawada.core.gates import (
    GateConfig,
    GateStore,
    PenaltyWeights,
    combined_penalty,
    project_gates_into_constraints,
)
from hawada.core.profiler import measure_latency_ms
from hawada.core.proxy_cost import CostTerm, LatencyProxy
from hawada.core.search_export import SearchConfig, grid_search_latency, search_export
from hawada.core.train import LagrangeTrainer, TrainConfig

__all__ = [
    "KDConfig",
    "kd_loss",
    "mse_reg",
    "combined_penalty",
    "project_gates_into_constraints",
    "LatencyProxy",
    "CostTerm",
    "measure_latency_ms",
    "ExportPolicy",
    "Rounding",
    "keep_group_indices_from_gate",
    "keep_element_indices_from_gate",
    "slice_linear",
    "slice_conv2d",
    "slice_embedding",
    "GateConfig",
    "GateStore",
    "PenaltyWeights",
    "grid_search_latency",
    "search_export",
    "SearchConfig",
    "LagrangeTrainer",
    "TrainConfig",
    "finetune_student",
    "FinetuneConfig",
]
