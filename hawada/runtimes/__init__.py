"""Deployment runtimes: build, save, load and time a plain model in the runtime users ship
(docs/DESIGN.md, "Runtimes").

``eager`` (fp32 PyTorch), ``int8_dynamic`` (torch dynamic int8 of the Linear layers),
``onnxruntime`` and ``onnxruntime_int8`` (extra ``hawada[onnx]``), ``compile`` (``torch.compile``
with inductor). ``save_artifact`` writes a runtime's own artifact into a folder, ``load_artifact``
loads it through that runtime's API, and ``time_artifacts`` times artifacts in child processes.
"""

import typing

from hawada.core.profiler import RuntimeName
from hawada.runtimes import onnx_runtimes, torch_runtimes  # noqa: F401  (register the runtimes)
from hawada.runtimes.base import (
    Deployed,
    Runtime,
    RuntimeMissingError,
    UnknownRuntimeError,
    build,
    get_runtime,
    load_artifact,
    runtime_names,
    save_artifact,
)
from hawada.runtimes.timing import Artifact, time_artifacts

# declared once, as the recipe's ``measure.runtime`` values
RUNTIMES: tuple[str, ...] = typing.get_args(RuntimeName)

__all__ = [
    "RUNTIMES",
    "Artifact",
    "Deployed",
    "Runtime",
    "RuntimeMissingError",
    "UnknownRuntimeError",
    "build",
    "get_runtime",
    "load_artifact",
    "runtime_names",
    "save_artifact",
    "time_artifacts",
]
