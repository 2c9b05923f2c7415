"""``hawada optimize``: setup -> gates -> search + export -> fine-tune -> report, one call per phase."""

from __future__ import annotations

import shutil
import time

import torch

from hawada.config import Recipe
from hawada.core.checkpoint import has_checkpoint
from hawada.core.distributed import DistEnv, barrier, init_from_env, on_main, shutdown
from hawada.run.context import Log, build_context, check_measure_runtime, quiet
from hawada.run.finetune_phase import finetune_slim
from hawada.run.folder import RunPaths, prepare_folder
from hawada.run.gates_phase import train_gates
from hawada.run.report import build_report, write_outputs
from hawada.run.search_phase import search_and_export
from hawada.run.setup import calibrated_proxy, load_setup, measure_setup


def optimize(recipe: Recipe, log: Log = print, resume: bool = False) -> dict:
    """Run the whole job of a validated recipe; returns the report (also written as JSON).

    Everything is written into ``<output.dir>.partial`` and renamed to ``output.dir`` only
    when complete. Gate training checkpoints into ``<output.dir>.partial/state``;
    ``resume=True`` continues from there (the measurements and teacher of the first start
    are reused, gate training continues exactly, later phases re-run). A run that fails
    before its first checkpoint leaves nothing behind.

    Launched by ``torchrun`` with several processes, gate training and fine-tuning run
    data-parallel (see :mod:`hawada.core.distributed`); rank 0 alone measures latency and
    writes files, and every rank returns the same report.
    """
    check_measure_runtime(recipe)  # a runtime that cannot be used fails before any work
    env = init_from_env(recipe.device, recipe.distributed.timeout_s)
    paths = RunPaths.of(recipe.output.dir)
    was_det = torch.are_deterministic_algorithms_enabled()
    try:
        on_main(env, lambda: prepare_folder(recipe, paths, resume))
        if recipe.deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            report = run_phases(recipe, paths, log if env.is_main else quiet, resume, env)
            barrier(env)  # every rank is done before the group goes (gloo aborts on a racing teardown)
            return report
        except BaseException:
            if env.is_main and not resume and not has_checkpoint(paths.checkpoints):
                shutil.rmtree(paths.partial, ignore_errors=True)
            raise
        finally:
            torch.use_deterministic_algorithms(was_det)
    finally:
        shutdown(env)


def run_phases(recipe: Recipe, paths: RunPaths, log: Log, resume: bool, env: DistEnv) -> dict:
    """The phases of a run whose folder is prepared (see docs/DESIGN.md, "Run phases")."""
    t_start = time.perf_counter()
    prior = load_setup(paths) if resume else None
    ctx = build_context(recipe, paths, env, log, teacher_state=prior[1] if prior else None)
    if prior is not None:
        setup = prior[0]
        log(
            f"resuming {paths.partial}: measurements of the first start reused (target {setup.target_ms:.2f} ms)"
        )
    else:  # measured by rank 0 alone (the other ranks wait: nothing else runs while it times)
        setup = on_main(env, lambda: measure_setup(ctx))
    proxy, calib = calibrated_proxy(ctx, setup)
    gates = train_gates(ctx, setup, proxy, calib, resume)
    chosen = search_and_export(ctx, gates.student, setup)
    slim, ft_history = finetune_slim(ctx, chosen.slim)

    def finish() -> dict:  # rank 0 measures, evaluates and writes; every rank returns the report
        report = build_report(ctx, setup, gates, chosen, slim, ft_history, t_start)
        report["output_dir"] = write_outputs(ctx, report, gates, slim, ft_history)
        return report

    report = on_main(env, finish)
    close = getattr(ctx.meter, "close", None)
    if close is not None:  # a runtime meter's worker processes and artifacts
        close()
    if not env.is_main:
        gates.metrics.close()
    return report


__all__ = ["optimize", "run_phases"]
