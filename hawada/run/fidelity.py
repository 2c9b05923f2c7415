"""``hawada profile``: keep-all latency and the latency proxy's fidelity on this device."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hawada.config import Recipe
from hawada.core.calibrate import calibration_logits, measure_subarchs, random_logits
from hawada.core.export import compute_dtype, store_of
from hawada.core.profiler import Meter, environment_info, measure_pooled, relative_meter
from hawada.core.proxy_cost import LatencyProxy, mape, spearman


def proxy_fidelity(
    gated: nn.Module,
    adapter: Any,
    inputs: Any,
    meter: Meter,
    device: str,
    modes: tuple[str, ...] = ("analytic", "lut"),
    calib_points: int = 6,
    points: int = 20,
    seed: int = 0,
    lut_kw: dict | None = None,
) -> dict:
    """Calibrate each proxy mode on ``calib_points`` measured sub-architectures, then report its
    error on ``points`` held-out random ones (MAPE in %, Spearman) and on keep-all (the proxy of
    every unit kept against keep-all's measured median). ``inputs`` give the shapes of the cost
    terms; ``meter`` times each exported sub-architecture on ``device``.

    As in a run (:func:`hawada.run.setup.measure_setup`), keep-all is measured first and every
    other point is timed next to it and put on its scale (:func:`relative_meter`)."""
    store = store_of(gated)
    reference = adapter.export_keepall(gated)
    meter(reference)  # the first calls of a process are slow (allocations, thread pool start)
    base_ms = measure_pooled([reference], meter, rounds=3)[0].median_ms
    rel = relative_meter(meter, reference, base_ms)
    calib = measure_subarchs(gated, calibration_logits(gated, calib_points, seed), rel)
    held = measure_subarchs(gated, random_logits(gated, points, seed + 1000), rel)
    measured = [m for _, m in held]
    out: dict = {
        "device": device,
        "calib_points": calib_points,
        "points": points,
        "keep_all_ms": base_ms,
        "modes": {},
    }
    terms = adapter.cost_terms(gated, inputs)
    for mode in modes:
        t0 = time.perf_counter()
        proxy = LatencyProxy(store, terms, mode=mode)
        ops = (
            proxy.measure_table(device=device, dtype=compute_dtype(gated), **(lut_kw or {}))
            if mode == "lut"
            else 0
        )
        fit = proxy.calibrate([w for w, _ in calib], [m for _, m in calib])
        with torch.no_grad():
            pred = [float(proxy(w.to(proxy.grid.device))) for w, _ in held]
            keep_all_pred = float(proxy(store.seg_units.to(proxy.grid.device)))
        out["modes"][mode] = {
            "mape_pct": mape(pred, measured),
            "keep_all_error_pct": 100.0 * (keep_all_pred - base_ms) / base_ms,
            "spearman": spearman(pred, measured),
            "calib_mape_pct": fit["mape"],
            "coef": fit["coef"],
            "ops_timed": ops,
            "build_seconds": time.perf_counter() - t0,
            "predicted_ms": pred,
        }
    out["measured_ms"] = measured
    out["summary"] = {
        m: {
            "mape_pct": round(v["mape_pct"], 2),
            "spearman": round(v["spearman"], 3),
            "keep_all_error_pct": round(v["keep_all_error_pct"], 2),
        }
        for m, v in out["modes"].items()
    }
    return out


def profile_recipe(
    recipe: Recipe, fidelity: bool = False, points: int = 20, log: Callable[[str], None] = print
) -> dict:
    """Keep-all latency of the recipe's model at its target batch; with ``fidelity``, the proxy's error."""
    from hawada.jobs import build_job
    from hawada.run.context import make_meter

    r = copy.deepcopy(recipe)
    r.teacher.epochs = 0  # latency does not depend on the weights' values
    device = torch.device(r.device)
    if r.threads:
        torch.set_num_threads(r.threads)
    job = build_job(r, device)
    meter = make_meter(r, job)
    base = meter(job.teacher)
    res: dict = {"keep_all": base.to_dict(), "versions": environment_info()}
    res["summary"] = {"keep_all_ms": round(base.median_ms, 3), "spread_ms": round(base.spread_ms, 3)}
    if fidelity:
        log(f"fidelity: {r.proxy.calib_points} calibration + {points} held-out sub-architectures")
        gated = job.adapter.attach(copy.deepcopy(job.teacher), r.gates)
        fid = proxy_fidelity(
            gated,
            job.adapter,
            job.latency_inputs,
            meter,
            str(device),
            calib_points=r.proxy.calib_points,
            points=points,
            seed=r.seed,
            lut_kw={"repeats": r.proxy.lut_repeats, "budget_s": r.proxy.lut_budget_s},
        )
        res["fidelity"] = fid
        res["summary"]["fidelity"] = fid["summary"]
    return res
