"""HawAda: make a pretrained PyTorch model faster on one device without losing what it knows."""

from hawada.api import attach, export, export_keepall, gates
from hawada.core.export import ExportPolicy, Rounding
from hawada.core.gates import GateConfig
from hawada.slim_io import load_slim, save_slim

__version__ = "0.1.0"

__all__ = [
    "attach",
    "gates",
    "export",
    "export_keepall",
    "GateConfig",
    "ExportPolicy",
    "Rounding",
    "load_slim",
    "save_slim",
    "__version__",
]
