"""Running a recipe: ``optimize`` and its phases (docs/DESIGN.md, "Run phases").

``folder`` (the run folder, metrics, resume), ``context`` (job, teacher, gated student),
``setup`` (measurements, target, proxy), ``gates_phase``, ``search_phase``, ``finetune_phase``,
``report``; ``optimize`` calls them in order. ``fidelity`` backs ``hawada profile``.
"""

from hawada.run.folder import OutputError, RunPaths, resume_recipe
from hawada.run.gates_phase import RunInterrupted
from hawada.run.optimize import optimize, run_phases
from hawada.run.setup import TargetError

__all__ = [
    "OutputError",
    "RunInterrupted",
    "RunPaths",
    "TargetError",
    "optimize",
    "resume_recipe",
    "run_phases",
]
