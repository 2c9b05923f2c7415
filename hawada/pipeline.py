"""``hawada optimize``: attach -> calibrate -> train -> search -> export -> fine-tune -> report."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import Adapter, get_adapter
from hawada.config import Recipe
from hawada.core.calibrate import calibration_logits, measure_subarchs
from hawada.core.distill import KDConfig
from hawada.core.export import ExportPolicy, export, param_count, store_of
from hawada.core.finetune import FinetuneConfig, finetune_student
from hawada.core.gates import GateConfig, PenaltyWeights
from hawada.core.profiler import LatencyResult, Meter, environment_info, latency_meter, summarize_samples
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.search_export import grid_search_latency
from hawada.core.train import LagrangeTrainer, TrainConfig, make_latency_probe


class TargetError(ValueError):
    """A latency target that no allowed keep set can reach."""


class OutputError(ValueError):
    """An output folder that would be overwritten without being asked."""


@dataclass
class Job:
    """What one data kind + model family needs from the pipeline.

    ``evaluate(teacher, student)`` returns agreement metrics; ``score_key`` names the one
    fine-tuning maximises. ``latency_inputs`` is the batch latency is measured at;
    ``timed(model)``, when set, is what is timed instead of the plain model (e.g. a decode step).
    """

    adapter: Adapter
    teacher: nn.Module
    train_loader: Any
    val_loader: Any
    latency_inputs: Any
    evaluate: Callable[[nn.Module, nn.Module, str], dict]
    score_key: str
    save: Callable[[nn.Module, str], None]
    info: dict
    timed: Callable[[nn.Module], Any] | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def build_job(recipe: Recipe, device: torch.device) -> Job:
    """The job for the recipe's data kind (each kind lives in its own module)."""
    if recipe.data.kind in ("digits", "imagefolder"):
        from hawada.jobs.vision_job import build_vision_job

        return build_vision_job(recipe, device)
    if recipe.data.kind == "stdlib_docstrings":
        from hawada.jobs.text_job import build_text_job

        return build_text_job(recipe, device)
    if recipe.data.kind == "stdlib_source":
        from hawada.jobs.lm_job import build_lm_job

        return build_lm_job(recipe, device)
    raise ValueError(f"data.kind {recipe.data.kind!r} has no job")


def gate_config(recipe: Recipe) -> GateConfig:
    g = recipe.gates
    return GateConfig(
        mode=g.mode,
        init_logit=g.init_logit,
        tau=g.tau,
        tau_final=g.tau_final,
        group_size=dict(g.group_size),
        min_keep=dict(g.min_keep),
        kinds=tuple(g.kinds) if g.kinds is not None else None,
    )


def kd_config(recipe: Recipe) -> KDConfig:
    k = recipe.kd
    return KDConfig(
        temperature=k.temperature,
        alpha_kl=k.alpha_kl,
        alpha_mse=k.alpha_mse,
        alpha_cos=k.alpha_cos,
        alpha_emb_mse=k.alpha_emb_mse,
    )


def make_meter(recipe: Recipe, job: Job) -> Meter:
    """The one way this run times a plain model (recipe's measure settings, job's inputs)."""
    m = recipe.measure
    return latency_meter(
        job.latency_inputs,
        recipe.device,
        job.timed,
        warmup=m.warmup,
        min_repeats=m.min_repeats,
        max_repeats=m.max_repeats,
        budget_s=m.budget_s,
    )


def check_output_dir(recipe: Recipe) -> str:
    out = recipe.output.dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"output.dir {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not recipe.output.overwrite:
        raise OutputError(
            f"output.dir {out} exists and is not empty (set output.overwrite=true to replace it)"
        )
    return out


@torch.no_grad()
def set_minimal_keep(store) -> None:
    """Logits so that each segment keeps exactly its ``min_keep`` gates (the fastest allowed)."""
    new = torch.full_like(store.logits, -1.0)
    for s in store.segments:
        new[s.start : s.start + s.min_keep] = 1.0
    store.logits.copy_(new)


def measure_pair(
    a: nn.Module, b: nn.Module, meter: Meter, rounds: int = 3
) -> tuple[LatencyResult, LatencyResult]:
    """Measure two models in the same run, interleaved A B A B ..., pooling the samples."""
    runs: dict[str, list[LatencyResult]] = {"a": [], "b": []}
    for _ in range(rounds):
        runs["a"].append(meter(a))
        runs["b"].append(meter(b))

    def pooled(rs: list[LatencyResult]) -> LatencyResult:
        xs = [x for r in rs for x in r.samples_ms]
        r = rs[-1]
        return LatencyResult(
            **summarize_samples(xs),
            n=len(xs),
            device=r.device,
            dtype=r.dtype,
            shapes=r.shapes,
            warmup=r.warmup,
            timer=r.timer,
            threads=r.threads,
            samples_ms=xs,
        )

    return pooled(runs["a"]), pooled(runs["b"])


def optimize(recipe: Recipe, log: Callable[[str], None] = print) -> dict:
    """Run the whole job of a validated recipe; returns the report (also written as JSON).

    Outputs are written into a temporary sibling folder and moved to ``output.dir`` only
    when complete: a failed run leaves nothing half-written.
    """
    t_start = time.perf_counter()
    out_dir = check_output_dir(recipe)
    device = torch.device(recipe.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is available")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    get_adapter(recipe.model.family)  # an unknown family fails before any work
    seed_everything(recipe.seed)

    job = build_job(recipe, device)
    adapter, teacher = job.adapter, job.teacher.to(device).eval()
    lat_in = job.latency_inputs
    dev = str(device)
    meter = make_meter(recipe, job)

    student = copy.deepcopy(teacher)
    adapter.attach(student, gate_config(recipe))
    store = store_of(student)
    log(f"gates: {len(store)} in {store.num_segments} segments")

    # -- how fast can it get? (measured, every segment at its minimum)
    saved = store.logits.detach().clone()
    base_ms = meter(teacher).median_ms
    set_minimal_keep(store)
    min_ms = meter(export(student, ExportPolicy(check=False))).median_ms
    with torch.no_grad():
        store.logits.copy_(saved)
    target_ms = (
        recipe.target.latency_ms if recipe.target.latency_ms is not None else recipe.target.ratio * base_ms
    )
    if target_ms < min_ms:
        raise TargetError(
            f"target latency {target_ms:.3g} ms is below the fastest allowed keep set ({min_ms:.3g} ms measured on "
            f"{dev} with every segment at its min_keep; keep-all {base_ms:.3g} ms)"
        )
    log(
        f"latency on {dev}: keep-all {base_ms:.2f} ms, smallest allowed {min_ms:.2f} ms, target {target_ms:.2f} ms"
    )

    # -- proxy: lookup table + calibration on several measured sub-architectures
    proxy = LatencyProxy(store, adapter.cost_terms(student, lat_in), mode=recipe.proxy.mode).to(device)
    if recipe.proxy.mode == "lut":
        n_ops = proxy.measure_table(
            device=dev, repeats=recipe.proxy.lut_repeats, budget_s=recipe.proxy.lut_budget_s
        )
        log(f"proxy lookup table: {n_ops} ops timed")
    calib = measure_subarchs(
        student, calibration_logits(student, recipe.proxy.calib_points, recipe.seed), meter
    )
    fit = proxy.calibrate([w for w, _ in calib], [m for _, m in calib])
    log(f"proxy calibrated on {len(calib)} measured sub-architectures: MAPE {fit['mape']:.1f}%")

    # -- gate training
    tr = recipe.train
    p = recipe.penalties
    cfg = TrainConfig(
        steps=tr.steps,
        lr_weights=tr.lr_weights,
        lr_gates=tr.lr_gates,
        weight_decay=tr.weight_decay,
        lambda_lr=tr.lambda_lr,
        lambda_max=tr.lambda_max,
        target_ramp_steps=tr.target_ramp_steps,
        probe_every=tr.probe_every,
        alternating=tr.alternating,
        amp=tr.amp,
        grad_clip=tr.grad_clip,
        progress=recipe.progress,
        kd=kd_config(recipe),
        penalties=PenaltyWeights(
            l0=p.l0, floor=p.floor, floor_frac=p.floor_frac, bimodal=p.bimodal, cost_weighted=p.cost_weighted
        ),
    )
    probe = make_latency_probe(student, meter)
    trainer = LagrangeTrainer(student, teacher, proxy, target_ms, cfg, probe=probe, calibration=calib)
    history = trainer.fit(job.train_loader)
    if not history or "real_ms" not in history[-1]:
        history[-1].update(trainer.probe_now())

    # -- rounding chosen by measured latency, then export
    student.eval()
    search = grid_search_latency(student, target_ms, meter, recipe.search.multiples, recipe.search.modes)
    log(
        f"search: {len(search.trials)} exports measured; chose multiple={search.best['multiple']} "
        f"mode={search.best['mode']} ({search.best['median_ms']:.2f} ms)"
    )
    policy = search.policy
    if recipe.export.uniform:
        policy = adapter.uniform_policy(student, policy)
    slim = export(student, policy).to(device)

    # -- fine-tune the slim model against the teacher
    ft = recipe.finetune
    fcfg = FinetuneConfig(
        steps=ft.steps,
        lr=ft.lr,
        warmup_steps=ft.warmup_steps,
        eval_every=ft.eval_every,
        bn_recalib_batches=ft.bn_recalib_batches,
        progress=recipe.progress,
    )
    slim, ft_hist = finetune_student(
        slim,
        teacher,
        adapter,
        job.train_loader,
        fcfg,
        kd_config(recipe),
        evaluate=lambda m: job.evaluate(teacher, m, "val")[job.score_key],
    )

    # -- honest report: both latencies measured in this run, interleaved
    t_base, t_slim = measure_pair(teacher, slim, meter)
    metrics = job.evaluate(teacher, slim, "test")
    report = {
        "name": recipe.name,
        "family": adapter.family,
        "device": dev,
        "latency": {
            "base": t_base.to_dict(),
            "slim": t_slim.to_dict(),
            "speedup": t_base.median_ms / t_slim.median_ms,
            "target_ms": target_ms,
            "min_allowed_ms": min_ms,
        },
        "params": {
            "base": param_count(teacher),
            "slim": param_count(slim),
            "ratio": param_count(slim) / param_count(teacher),
        },
        "agreement": metrics,
        "layout": {"base": adapter.layout(teacher), "slim": adapter.layout(slim)},
        "search": {"chosen": search.best, "met_target": search.met_target, "trials": search.trials},
        "proxy": {
            "mode": proxy.mode,
            "coef": proxy.coef.tolist(),
            "calibration": proxy.calibration,
            "initial_fit_mape": fit["mape"],
        },
        "train": {"steps": cfg.steps, "seconds": getattr(trainer, "seconds", None)},
        "job": job.info,
        "versions": environment_info(),
        "recipe": recipe.to_dict(),
        "wall_seconds": time.perf_counter() - t_start,
    }
    tmp = f"{out_dir.rstrip('/')}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        job.save(slim, os.path.join(tmp, "slim"))
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            for rec in history:
                f.write(json.dumps({"phase": "gates", **rec}) + "\n")
            for rec in ft_hist:
                f.write(json.dumps({"phase": "finetune", **rec}) + "\n")
        if recipe.output.plot:
            from hawada.report import plot_run

            plot_run(report, history, os.path.join(tmp, "report.png"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["output_dir"] = out_dir
    return report
