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
from hawada.core.qat import qat_scheme
from hawada.run.context import RunContext
from hawada.run.folder import clear_outputs, publish
from hawada.run.gates_phase import GatePhase
from hawada.run.search_phase import QUALITY_KEY, QUALITY_LABEL, SearchPhase
from hawada.run.setup import POOLED_ROUNDS, Setup, progress_bar
from hawada.runtimes import get_runtime, save_artifact
from hawada.runtimes.meter import DeployedModel


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
    with progress_bar(ctx, "report: keep-all vs slim", 2 * POOLED_ROUNDS) as bar:
        t_base, t_slim = measure_pooled([teacher, slim], bar.counting(ctx.meter), rounds=POOLED_ROUNDS)
    runtime = recipe.measure.runtime
    metrics = ctx.job.evaluate(teacher, deployed_form(slim, runtime, ctx.job.latency_inputs), "test")
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
            # every latency of the run was measured in this runtime (measure.runtime)
            "runtime": {"name": runtime, "versions": get_runtime(runtime).versions()},
        },
        "params": {
            "base": param_count(teacher),
            "slim": param_count(slim),
            "ratio": param_count(slim) / param_count(teacher),
        },
        "agreement": metrics,
        # the model the agreement was measured on: the slim model in the deployed runtime (its
        # int8 / ONNX outputs), "eager" for the fp32 PyTorch model itself
        "agreement_measured_in": runtime,
        "layout": {"base": adapter.layout(teacher), "slim": adapter.layout(slim)},
        "search": {
            "chosen": chosen.search.best,
            "met_target": chosen.search.met_target,
            "units_moved_frac": chosen.units_moved_frac,
            "trials": chosen.search.trials,
            "finalists": chosen.search.finalists,  # re-timed interleaved; chosen: the best that passed
            "fallback": chosen.search.fallback,
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
            # fine-tuned with fake int8 Linears (finetune.qat; auto: an int8 measure.runtime)
            "finetune_qat": qat_scheme(recipe.finetune.qat, runtime) is not None,
        },
        "distributed": {**ctx.env.to_dict(), "replica_checks": trainer.replica_checks},
        "job": ctx.job.info,
        "versions": environment_info(),
        "recipe": recipe.to_dict(),
        "wall_seconds": time.perf_counter() - t_start,
    }


def deployed_form(slim: nn.Module, runtime: str, example_inputs: Any) -> nn.Module:
    """What the report scores: ``slim`` itself for eager, else its deployed form in ``runtime``
    (:class:`~hawada.runtimes.meter.DeployedModel`; ONNX Runtime runs in this process here, after
    every timing of the run)."""
    if runtime == "eager":
        return slim
    return DeployedModel(slim, runtime, example_inputs)


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
    slim_dir = os.path.join(paths.partial, "slim")
    ctx.job.save(slim, slim_dir)
    if ctx.recipe.measure.runtime != "eager":  # the deployable artifact, beside the weights it comes from
        save_artifact(slim, ctx.job.latency_inputs, slim_dir, ctx.recipe.measure.runtime)
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


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(w)}  {v}" for k, v in rows]
    bar = "-" * max(len(s) for s in lines)
    return "\n".join([bar, *lines, bar])


def _blocks(layers: Any) -> list[dict]:
    """The per-layer entries of a layout, in order (ResNet's stages of blocks flattened)."""
    if isinstance(layers, dict):
        return [layers]
    return [d for x in layers for d in _blocks(x)] if isinstance(layers, list) else []


def _ints(values: list[Any]) -> str:
    return " ".join(str(v) for v in values)


def layer_units(layout: dict) -> dict[str, list[int]] | None:
    """What each layer keeps, by kind, from a layout (``adapter.layout`` / layout.json):
    ``{"heads": [...], "FFN": [...]}`` per transformer layer (``"KV heads"`` too for decoders),
    ``{"channels": [...]}`` per residual block (inner channels; a block whose branch was removed
    entirely is a constant: 0). None for a family without such a summary."""
    blocks = _blocks(layout.get("layers", []))
    fam = layout.get("family")
    if fam == "hf_encoder":
        hd = max(int(layout.get("head_dim") or 1), 1)
        return {"heads": [b["attn"] // hd for b in blocks], "FFN": [b["ffn"] for b in blocks]}
    if fam == "hf_decoder":
        return {
            "heads": [b["heads"] for b in blocks],
            "KV heads": [b["kv_heads"] for b in blocks],
            "FFN": [b["intermediate"] for b in blocks],
        }
    if fam == "resnet":
        return {"channels": [0 if b.get("constant") else sum(b["inner"]) for b in blocks]}
    return None


def layout_rows(layout: dict, base: dict | None = None) -> list[tuple[str, str]]:
    """Terminal rows that sum up a layout: kept heads, KV heads and FFN width per layer, or inner
    channels per residual block (:func:`layer_units`). With ``base`` (the keep-all layout), each
    row also gives the kept and keep-all totals."""
    units = layer_units(layout)
    if units is None:
        return [("layers", str(len(_blocks(layout.get("layers", [])))))]
    full = layer_units(base) if base is not None else None
    rows = []
    if layout.get("family") == "resnet":  # the residual stream's width at the stem
        rows.append(
            ("stem", f"{layout.get('stem')}" + (f" of {base.get('stem')}" if base is not None else ""))
        )
    for kind, values in units.items():
        text = _ints(values)
        if full is not None:
            text += f"  ({sum(values):,} of {sum(full[kind]):,})"
        rows.append((f"{kind} per {'block' if kind == 'channels' else 'layer'}", text))
    removed = removed_layers(layout)
    if removed:
        rows.append(("removed layers", f"{_ints(removed)}  ({len(removed)} of {layout['layers_of']})"))
    return rows


def removed_layers(layout: dict) -> list[int]:
    """The original indices of the transformer layers a slim layout no longer has (layer gates
    closed at export; ``kept_layers`` / ``layers_of`` in the layout), ascending."""
    kept = layout.get("kept_layers")
    if kept is None:
        return []
    return sorted(set(range(int(layout["layers_of"]))) - {int(i) for i in kept})


def _by_original_layer(layout: dict, units: dict[str, list[int]]) -> dict[str, list[int]]:
    """``units`` of a layout with one entry per ORIGINAL layer: a removed layer keeps 0 of each."""
    kept = layout.get("kept_layers")
    if kept is None:
        return units
    out = {}
    for kind, values in units.items():
        full = [0] * int(layout["layers_of"])
        for i, v in zip(kept, values):
            full[int(i)] = v
        out[kind] = full
    return out


def layer_widths(layout: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{name: (keep-all, slim)}`` per layer and kind, in layer order (``heads 0``, ``FFN 0``,
    ``heads 1``, ...; ``stem``, ``block 0``, ... for a ResNet) from report.json's ``layout``."""
    b, s = layer_units(layout["base"]), layer_units(layout["slim"])
    if b is None or s is None:
        return _widths_from_layout(layout)
    s = _by_original_layer(layout["slim"], s)  # a removed layer is drawn as 0 kept
    out: dict[str, tuple[int, int]] = {}
    if "stem" in layout["base"]:
        out["stem"] = (int(layout["base"]["stem"]), int(layout["slim"]["stem"]))
    n = len(next(iter(b.values())))
    for i in range(n):
        for kind in b:
            name = f"block {i}" if kind == "channels" else f"{kind} {i}"
            out[name] = (int(b[kind][i]), int(s[kind][i]))
    return out


def format_report(report: dict) -> str:
    """A plain-text summary table of :func:`hawada.run.optimize`'s report (also what
    ``hawada eval`` prints for a run's slim model)."""
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
    runtime = (lat.get("runtime") or {}).get("name", "eager")
    rows.insert(1, ("runtime", runtime))
    for k, v in report["agreement"].items():
        rows.append((k, f"{v:.4f}" if isinstance(v, float) else str(v)))
    if "agreement_measured_in" in report:
        rows.append(("agreement measured in", report["agreement_measured_in"]))
    ch = report["search"]["chosen"]
    rows.append(
        (
            "rounding",
            f"multiple {ch['multiple']}, {ch['mode']} (of {len(report['search']['trials'])} measured)",
        )
    )
    layout = report.get("layout") or {}
    if "slim" in layout:
        rows += layout_rows(layout["slim"], layout.get("base"))
    return _table(rows)


def format_slim_summary(layout: dict, params: int, latency: dict, folder: str) -> str:
    """What can be known of a saved slim model without its run's report: the family, the layout,
    the parameters and a latency measured now (``latency``: ``LatencyResult.to_dict()``)."""
    rows = [
        ("model", folder),
        (
            "family",
            f"{layout.get('family')} ({layout.get('class') or layout.get('arch') or layout.get('block')})",
        ),
        ("parameters", f"{params:,}"),
        *layout_rows(layout),
        ("device", f"{latency['device']} ({latency['threads']} threads, timer {latency['timer']})"),
        ("runtime", latency.get("runtime", "eager")),
        ("input", f"{latency['shapes']} {latency['dtype']}"),
        ("latency (now)", _fmt_lat(latency)),
        ("missing", "no report.json beside it: keep-all latency, speedup and agreement are unknown"),
    ]
    return _table(rows)


GATE_MASS_LABEL = "kept gate probability mass (keep-all = 1)"


def _quality(trial: dict) -> tuple[float, str]:
    """A trial's quality and what it is: the output cosine to the teacher the search measured, or
    (in a report from before that was measured) the kept gate mass."""
    if QUALITY_KEY in trial:
        return float(trial[QUALITY_KEY]), QUALITY_LABEL
    return float(trial["gate_mass"]), GATE_MASS_LABEL


def _relative_ms(trial: dict, base_ms: float) -> float:
    """A trial's latency over keep-all: the keep-all timed next to it when there is one."""
    return float(trial["median_ms"]) / float(trial.get("reference_ms") or base_ms)


def plot_data(report: dict) -> dict:
    """What report.png shows, as plain numbers.

    ``plane``: the search on the latency-quality plane. ``x`` is latency over keep-all (each trial
    against the keep-all timed right before it; without one, against the report's keep-all), ``y``
    the trial's quality (``y_label`` says which); ``keepall`` is (1, 1): keep-all has the teacher's
    outputs and all of its gate mass. ``trials`` holds every trial (``label`` e.g. ``8/floor``,
    ``fill+3``), ``chosen`` the chosen one, ``target`` the target as a fraction of keep-all.
    ``layers``: ``{name: (keep-all, slim)}`` in layer order (:func:`layer_widths`: heads and FFN
    per layer, channels per block).
    """
    lat, search = report["latency"], report["search"]
    base_ms = float(lat["base"]["median_ms"])
    trials = search["trials"]
    y_label = _quality(trials[0])[1] if trials else QUALITY_LABEL
    points = []
    for t in trials:
        if t["mode"] == "fill":
            label = f"fill+{t.get('reopened', '?')}"
        elif t["mode"] == "trim":
            label = f"trim-{t.get('closed', '?')}"
        else:
            label = f"{t['multiple']}/{t['mode']}"
        points.append(
            {
                "x": _relative_ms(t, base_ms),
                "y": _quality(t)[0],
                "label": label,
                "within_target": bool(t["within_target"]),
            }
        )
    ch = search["chosen"]
    chosen = {"x": _relative_ms(ch, base_ms), "y": _quality(ch)[0], "label": "chosen"}
    ref = ch.get("reference_ms") or lat.get("search_base_ms") or base_ms
    target = float(lat["target_ms"]) / float(ref)
    return {
        "plane": {
            "keepall": {"x": 1.0, "y": 1.0},
            "trials": points,
            "chosen": chosen,
            "target": target,
            "x_label": "latency / keep-all (timed next to each other)",
            "y_label": y_label,
        },
        "layers": layer_widths(report["layout"]),
    }


def plot_run(report: dict, history: list[dict], path: str) -> dict | None:
    """report.png: the search's trials on the latency-quality plane (keep-all, every trial, the
    chosen export), the kept widths per layer, and the gate-training curves (proxy and measured ms
    against the target; lambda and KD loss).

    Returns the plotted data (:func:`plot_data`), or None (and writes nothing) when matplotlib is
    not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    data = plot_data(report)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    ax, pl = axes[0, 0], data["plane"]
    for ok, colour, name in (
        (True, "tab:blue", "trial within target"),
        (False, "tab:orange", "trial over target"),
    ):
        pts = [p for p in pl["trials"] if p["within_target"] == ok]
        if pts:
            ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], c=colour, s=25, label=name)
    for p in pl["trials"]:
        ax.annotate(p["label"], (p["x"], p["y"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.scatter([pl["keepall"]["x"]], [pl["keepall"]["y"]], marker="s", c="black", s=50, label="keep-all")
    ax.scatter([pl["chosen"]["x"]], [pl["chosen"]["y"]], marker="*", c="tab:red", s=200, label="chosen")
    ax.axvline(pl["target"], ls="--", c="gray", label=f"target {pl['target']:.2f}")
    ax.set_xlabel(pl["x_label"])
    ax.set_ylabel(pl["y_label"])
    ax.set_title("search: latency vs quality of every measured export")
    ax.legend(fontsize=7)

    # kinds differ in scale (4 heads, 1536 FFN units): bars are the kept share, labelled with counts
    ax, widths = axes[0, 1], data["layers"]
    names = list(widths)
    share = [s / b if b else 0.0 for b, s in widths.values()]
    ax.bar(range(len(names)), [1.0] * len(names), color="lightgray", label="removed")
    ax.bar(range(len(names)), share, color="tab:blue", label="kept")
    for i, (b, s) in enumerate(widths.values()):
        ax.annotate(f"{s}/{b}", (i, 1.0), ha="center", va="bottom", fontsize=5, rotation=90)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("kept share of keep-all")
    ax.set_title("kept per layer (slim / keep-all)")
    ax.legend(fontsize=7, loc="upper right")

    steps = [h["step"] for h in history]
    ax = axes[1, 0]
    if history:
        ax.plot(steps, [h["proxy_ms"] for h in history], label="proxy ms")
        ax.plot(steps, [h["target_ms"] for h in history], "--", label="target ms")
    real = [(h["step"], h["real_ms"]) for h in history if "real_ms" in h]
    if real:
        ax.plot(*zip(*real), "o", label="measured ms")
    ax.set_title("latency during gate training")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    if history:
        ax.plot(steps, [h["kd"] for h in history], c="tab:green", label="KD loss")
        ax2 = ax.twinx()
        ax2.plot(steps, [h["lambda"] for h in history], c="tab:purple", label="lambda")
        ax2.set_ylabel("lambda")
    ax.set_ylabel("KD loss")
    ax.set_xlabel("step")
    ax.set_title("gate training: KD loss and lambda")
    fig.suptitle(f"{report['name']}: {report['latency']['speedup']:.2f}x on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


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
