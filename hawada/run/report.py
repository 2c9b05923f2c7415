"""Report phase: both latencies measured in this run, interleaved; agreement on the test split;
then report.json, report.png, the slim model and the metrics, and the folder is published."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from torch import nn

from hawada.core.export import param_count
from hawada.core.profiler import environment_info, measure_pooled, ratio_ci
from hawada.run.context import RunContext
from hawada.run.folder import clear_outputs, publish
from hawada.run.gates_phase import GatePhase
from hawada.run.search_phase import SearchPhase
from hawada.run.setup import Setup


def build_report(
    ctx: RunContext,
    setup: Setup,
    gates: GatePhase,
    chosen: SearchPhase,
    slim: nn.Module,
    finetune_history: list[dict],
    t_start: float,
) -> dict:
    """Measure keep-all and ``slim`` interleaved, score ``slim`` on the test split, and describe the
    run (the keys of report.json)."""
    recipe, teacher, adapter, trainer = ctx.recipe, ctx.teacher, ctx.adapter, gates.trainer
    t_base, t_slim = measure_pooled([teacher, slim], ctx.meter)
    metrics = ctx.job.evaluate(teacher, slim, "test")
    proxy = trainer.proxy
    return {
        "name": recipe.name,
        "family": adapter.family,
        "device": ctx.dev,
        "latency": {
            "base": t_base.to_dict(),
            "slim": t_slim.to_dict(),
            "speedup": t_base.median_ms / t_slim.median_ms,
            "speedup_ci": list(ratio_ci(t_base, t_slim)),  # bootstrap 95% of the interleaved pair
            "target_ms": chosen.target_ms,  # what the chosen export was held to
            "train_target_ms": setup.target_ms,  # what gate training aimed its proxy at
            "setup_base_ms": setup.base_ms,
            "search_base_ms": chosen.base_ms,
            "min_allowed_ms": setup.min_ms,
            "tokens_per_s": tokens_per_s(ctx.job.info, t_base.median_ms, t_slim.median_ms),
        },
        "params": {
            "base": param_count(teacher),
            "slim": param_count(slim),
            "ratio": param_count(slim) / param_count(teacher),
        },
        "agreement": metrics,
        "layout": {"base": adapter.layout(teacher), "slim": adapter.layout(slim)},
        "search": {
            "chosen": chosen.search.best,
            "met_target": chosen.search.met_target,
            "units_moved_frac": chosen.units_moved_frac,
            "trials": chosen.search.trials,
        },
        "proxy": {
            "mode": proxy.mode,
            "coef": proxy.coef.tolist(),
            "calibration": proxy.calibration,
            "initial_fit_mape": setup.initial_fit_mape,
            "calib_mape": setup.initial_fit_mape,  # at setup, before the probes refit it
            "keepall_error": setup.keepall_error,
        },
        "train": {
            "steps": trainer.cfg.steps,
            "seconds": getattr(trainer, "seconds", None),
            "lambda_end": float(trainer.lam),
            "lambda_max": trainer.cfg.lambda_max,
            "landing": gates.landing,
            "skipped_steps": trainer.bad_total,  # non-finite loss or gradient: no update
            "finetune_skipped_steps": sum(1 for r in finetune_history if r.get("skipped")),
        },
        "distributed": {**ctx.env.to_dict(), "replica_checks": trainer.replica_checks},
        "job": ctx.job.info,
        "versions": environment_info(),
        "recipe": recipe.to_dict(),
        "wall_seconds": time.perf_counter() - t_start,
    }


def tokens_per_s(info: dict, base_ms: float, slim_ms: float) -> dict | None:
    """``{"base", "slim"}`` tokens per second of the timed call (median latency), when the job
    says how many tokens one call handles (``info["timed"]["tokens_per_call"]``); else None."""
    n = (info.get("timed") or {}).get("tokens_per_call")
    if not n:
        return None
    return {"base": n * 1000.0 / base_ms, "slim": n * 1000.0 / slim_ms, "tokens_per_call": n}


def write_outputs(
    ctx: RunContext, report: dict, gates: GatePhase, slim: nn.Module, finetune_history: list[dict]
) -> str:
    """Write the metrics, the slim model, report.png and report.json, then publish the folder
    under ``output.dir`` (returned)."""
    paths = ctx.paths
    for rec in finetune_history:
        gates.metrics.write("finetune", rec)
    gates.metrics.close()
    clear_outputs(paths, ("slim", "report.png", "report.json"))
    ctx.job.save(slim, os.path.join(paths.partial, "slim"))
    if ctx.recipe.output.plot:
        plot_run(report, gates.history, os.path.join(paths.partial, "report.png"))
    with open(os.path.join(paths.partial, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return publish(paths, ctx.recipe.output.keep_state)


def _fmt_lat(d: dict) -> str:
    return f"{d['median_ms']:.2f} ms (p20-p80 {d['p20_ms']:.2f}-{d['p80_ms']:.2f}, n={d['n']})"


def _fmt_speedup(lat: dict) -> str:
    ci = lat.get("speedup_ci")
    interval = f" (95% {ci[0]:.2f}-{ci[1]:.2f})" if ci else ""
    return f"{lat['speedup']:.2f}x{interval}, target {lat['target_ms']:.2f} ms"


def format_report(report: dict) -> str:
    """A plain-text summary table of :func:`hawada.run.optimize`'s report."""
    lat, par = report["latency"], report["params"]
    base = lat["base"]
    rows = [
        ("device", f"{report['device']} ({base['threads']} threads, timer {base['timer']})"),
        ("input", f"{base['shapes']} {base['dtype']}"),
        ("base latency", _fmt_lat(lat["base"])),
        ("slim latency", _fmt_lat(lat["slim"])),
        ("speedup", _fmt_speedup(lat)),
        ("parameters", f"{par['base']:,} -> {par['slim']:,} ({par['ratio']:.1%})"),
    ]
    if tps := lat.get("tokens_per_s"):
        rows.append(("tokens/s", f"{tps['base']:.1f} -> {tps['slim']:.1f}"))
    for k, v in report["agreement"].items():
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    ch = report["search"]["chosen"]
    rows.append(
        (
            "rounding",
            f"multiple {ch['multiple']}, {ch['mode']} (of {len(report['search']['trials'])} measured)",
        )
    )
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    bar = "-" * max(len(s) for s in lines)
    return "\n".join([bar, *lines, bar])


def plot_run(report: dict, history: list[dict], path: str) -> bool:
    """Per-layer kept widths and training curves (proxy/real ms, lambda, KD) as a PNG.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    widths = report.get("widths") or _widths_from_layout(report["layout"])
    ax = axes[0, 0]
    names = list(widths)
    ax.bar(range(len(names)), [widths[n][1] for n in names], color="tab:blue", label="slim")
    ax.bar(
        range(len(names)),
        [widths[n][0] - widths[n][1] for n in names],
        bottom=[widths[n][1] for n in names],
        color="lightgray",
        label="removed",
    )
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_title("kept width per layer")
    ax.legend()
    steps = [h["step"] for h in history]
    ax = axes[0, 1]
    ax.plot(steps, [h["proxy_ms"] for h in history], label="proxy ms")
    ax.plot(steps, [h["target_ms"] for h in history], "--", label="target ms")
    real = [(h["step"], h["real_ms"]) for h in history if "real_ms" in h]
    if real:
        ax.plot(*zip(*real), "o", label="measured ms")
    ax.set_title("latency during gate training")
    ax.legend()
    axes[1, 0].plot(steps, [h["lambda"] for h in history])
    axes[1, 0].set_title("lambda")
    axes[1, 1].plot(steps, [h["kd"] for h in history])
    axes[1, 1].set_title("KD loss")
    for a in axes[1]:
        a.set_xlabel("step")
    fig.suptitle(f"{report['name']}: {report['latency']['speedup']:.2f}x on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _widths_from_layout(layout: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{layer: (base width, slim width)}`` from base/slim layouts (any family)."""
    out: dict[str, tuple[int, int]] = {}

    def walk(b: Any, s: Any, prefix: str) -> None:
        if isinstance(b, dict):
            for k in b:
                if k in s:
                    walk(b[k], s[k], f"{prefix}.{k}" if prefix else k)
        elif isinstance(b, list):
            for i, (x, y) in enumerate(zip(b, s)):
                walk(x, y, f"{prefix}[{i}]")
        elif isinstance(b, int) and not isinstance(b, bool) and isinstance(s, int):
            out[prefix] = (b, s)

    walk(layout["base"], layout["slim"], "")
    return {k: v for k, v in out.items() if not k.endswith("num_classes")}
