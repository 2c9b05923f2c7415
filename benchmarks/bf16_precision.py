"""bf16 / fp16 numbers behind the master-weight and export-check design (docs/DESIGN.md, "Precision").

1. Fraction of weights a few gate-training steps change: 10 steps at lr 2e-5 on one batch, for a
   random LLaMA, Qwen2 (grouped-query attention) and BERT, in fp32, in bf16 with fp32 master
   weights (what the trainer does) and in bf16 stepping the bf16 weights directly (what it did
   before). Also the cosine between the bf16 and fp32 weight updates.
2. The export check's relative error over random keep sets, per family and dtype, against the
   dtype's bound (``export_tolerance``): median, 95th percentile and maximum.

The models and the training set-up are the ones tests/test_bf16.py asserts on, imported from it so
that the numbers and the tests describe the same runs.

Run: ``python benchmarks/bf16_precision.py`` (about a minute on 2 cores); writes
``benchmarks/results/bf16_precision.json``.
"""

from __future__ import annotations

import os
import sys

import torch
from common import HERE, write_result

sys.path.insert(0, os.path.dirname(HERE))

import hawada.core.train as train_mod  # noqa: E402
from hawada.core.export import (  # noqa: E402
    ExportPolicy,
    check_export,
    export,
    export_tolerance,
    keep_indices,
    store_of,
)
from hawada.core.proxy_cost import set_random_keep  # noqa: E402
from tests.test_bf16 import (  # noqa: E402
    FAMILIES,
    NoMasters,
    batch_for,
    build,
    changed_fraction,
    gated,
    trainer,
    weight_values,
)

STEPS = 10
KEEP_SETS = 40


def updated_fractions(family: str) -> dict:
    """Changed fraction of the weights after ``STEPS`` steps, per precision scheme."""
    batch = batch_for(family)
    runs = {}
    original = train_mod.MasterWeights
    try:
        for name, dtype in (
            ("fp32", torch.float32),
            ("bf16_masters", torch.bfloat16),
            ("bf16_plain", torch.bfloat16),
        ):
            train_mod.MasterWeights = NoMasters if name == "bf16_plain" else original
            tr = trainer(family, dtype, steps=STEPS)
            before = weight_values(tr)
            kd = [tr.step(batch)["kd"] for _ in range(STEPS)]
            runs[name] = (before, weight_values(tr), kd)
    finally:
        train_mod.MasterWeights = original
    out = {
        k: {"changed_frac": changed_fraction(b, a), "kd_drop": kd[0] - kd[-1]}
        for k, (b, a, kd) in runs.items()
    }
    d32 = torch.cat([(a - b).flatten() for b, a in zip(*runs["fp32"][:2])])
    d16 = torch.cat([(a - b).flatten() for b, a in zip(*runs["bf16_masters"][:2])])
    out["update_cosine_bf16_vs_fp32"] = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    return out


def export_errors(family: str, dtype: torch.dtype) -> dict:
    """The export check's relative error on ``KEEP_SETS`` random keep sets of a 2-layer model."""
    g = gated(build(family, 0, dtype))
    store = store_of(g)
    g.eval()
    gen = torch.Generator().manual_seed(0)
    errs = []
    for _ in range(KEEP_SETS):
        set_random_keep(store, gen)
        slim = export(g, ExportPolicy(check=False))
        errs.append(check_export(g, slim, keep_indices(store)))
    e = torch.tensor(errs, dtype=torch.float64)
    return {
        "bound": export_tolerance(dtype, 2),
        "median": float(e.median()),
        "p95": float(e.quantile(0.95)),
        "max": float(e.max()),
        "max_over_bound": float(e.max()) / export_tolerance(dtype, 2),
        "n": len(errs),
    }


def main() -> None:
    updates = {f: updated_fractions(f) for f in FAMILIES}
    errors = {
        f: {
            str(dt).split(".")[-1]: export_errors(f, dt)
            for dt in (torch.float32, torch.bfloat16, torch.float16)
        }
        for f in FAMILIES
    }
    write_result(
        "bf16_precision",
        {
            "steps": STEPS,
            "lr": 2e-5,
            "keep_sets": KEEP_SETS,
            "weights_updated": updates,
            "export_error": errors,
        },
    )


if __name__ == "__main__":
    main()
