"""Does the demo reproduce? Run a recipe's whole ``hawada optimize`` several times in a row, each
in its own process, and collect what a new user would read in each report.

Per run: the interleaved speedup and its bootstrap 95% interval, the mean test cosine and
retrieval top-1, where gate training landed (its eval-mode keep set, exported and measured,
against the training target), lambda at the end against its cap, the share of units the search
moved, the proxy's keep-all error after calibration, and the wall time. The summary gives the
range over runs (the README quotes that range, never the best run) and whether every run landed
within the tolerance of the target ratio.

Run: ``python benchmarks/demo_runs.py --runs 3`` (about 15 minutes per run of the MiniLM demo on
2 cores; nothing else should run meanwhile). ``--recipe``/``--set`` run another recipe or override
keys; ``--name`` names the JSON under ``benchmarks/results/``; ``--append`` adds runs to it (one
run at a time, each looked at before the next); ``--keep DIR`` keeps each run's folder (its slim model
for ``runtime_side_by_side.py --slim``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import HERE, results_dir, write_result

ROOT = os.path.dirname(HERE)


def summarize_report(report: dict) -> dict:
    """The numbers of one report.json that say whether the run did what its recipe asked."""
    lat, train, search = report["latency"], report["train"], report["search"]
    target_ratio = report["recipe"]["target"].get("ratio")
    landing = train.get("landing") or {}
    out = {
        "speedup": lat["speedup"],
        "speedup_ci": lat["speedup_ci"],
        "base_ms": lat["base"]["median_ms"],
        "slim_ms": lat["slim"]["median_ms"],
        "slim_over_base": lat["slim"]["median_ms"] / lat["base"]["median_ms"],
        "target_ratio": target_ratio,
        "mean_cosine": report["agreement"].get("mean_cosine"),
        "retrieval_top1": report["agreement"].get("retrieval_top1"),
        "landing_error": landing.get("error"),
        "landing_units": [landing.get("units"), landing.get("units_total")],
        "lambda_end": train.get("lambda_end"),
        "lambda_max": train.get("lambda_max"),
        "units_moved_frac": search.get("units_moved_frac"),
        "search_fallback": search.get("fallback"),
        "proxy_keepall_error": report["proxy"].get("keepall_error"),
        "proxy_calib_mape": report["proxy"].get("initial_fit_mape"),
        "agreement": report["agreement"],
        "tokens_per_s": lat.get("tokens_per_s"),
        "params_ratio": report["params"]["ratio"],
        "layout": report["layout"]["slim"].get("layers"),
        "wall_seconds": report.get("wall_seconds"),
    }
    if target_ratio:
        # the final, independent measurement against the target the recipe set
        out["final_vs_target"] = out["slim_over_base"] / target_ratio - 1.0
    return out


def run_once(recipe: str, sets: list[str], out_dir: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "hawada", "optimize", recipe, "--set", f"output.dir={out_dir}",
           "--set", "output.overwrite=true"]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - t0
    return read_report(out_dir), wall


def read_report(run_dir: str) -> dict:
    """The report.json of a finished run folder."""
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def spread(xs: list[float]) -> dict:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {}
    mid = xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])
    return {"min": xs[0], "median": mid, "max": xs[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/cpu/minilm-l6.yaml")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], dest="sets", help="KEY=VALUE recipe override")
    ap.add_argument("--name", default="demo_runs")
    ap.add_argument("--tolerance", type=float, default=0.05, help="landing tolerance on the target ratio")
    ap.add_argument("--append", action="store_true", help="add these runs to those already in the JSON")
    ap.add_argument(
        "--keep", default=None, help="keep each run's folder under this directory (run0, run1, ...)"
    )
    args = ap.parse_args()
    runs = []
    previous = os.path.join(results_dir(), f"{args.name}.json")
    if args.append and os.path.isfile(previous):
        with open(previous) as f:
            old = json.load(f)
        if old.get("recipe") != args.recipe or old.get("overrides") != args.sets:
            raise SystemExit(f"{previous} holds runs of another recipe or other overrides")
        runs = list(old["runs"])
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            report, wall = run_once(args.recipe, args.sets, os.path.join(args.keep or tmp, f"run{len(runs)}"))
            runs.append({**summarize_report(report), "process_seconds": wall})
            print(json.dumps(runs[-1]), flush=True)
    keys = ("speedup", "mean_cosine", "retrieval_top1", "final_vs_target", "landing_error", "lambda_end",
            "units_moved_frac", "proxy_keepall_error", "process_seconds")  # fmt: skip
    summary = {k: spread([r.get(k) for r in runs]) for k in keys}
    finals = [r.get("final_vs_target") for r in runs]
    summary["all_within_tolerance"] = all(f is not None and abs(f) <= args.tolerance for f in finals)
    summary["lambda_below_cap"] = all(r["lambda_end"] < r["lambda_max"] for r in runs)
    write_result(
        args.name,
        {"recipe": args.recipe, "overrides": args.sets, "tolerance": args.tolerance, "summary": summary,
         "runs": runs},
    )  # fmt: skip


if __name__ == "__main__":
    main()
