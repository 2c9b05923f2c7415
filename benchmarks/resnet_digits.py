"""Claim (issue 2d): the digits recipe end to end: measured speedup and accuracy, base vs slim,
both latencies measured in the same run on this CPU."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from common import write_result

from hawada.config import load_recipe
from hawada.run import optimize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    out = tempfile.mkdtemp()
    try:
        recipe = load_recipe(
            os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"),
            [f"output.dir={out}/run", "progress=false"],
        )
        t0 = time.perf_counter()
        rep = optimize(recipe)
        wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    lat = rep["latency"]
    write_result(
        "resnet18_digits",
        {
            "recipe": "recipes/cpu/resnet18_digits.yaml",
            "base_ms": {k: lat["base"][k] for k in ("median_ms", "p20_ms", "p80_ms", "n")},
            "slim_ms": {k: lat["slim"][k] for k in ("median_ms", "p20_ms", "p80_ms", "n")},
            "speedup": lat["speedup"],
            "target_ms": lat["target_ms"],
            "params": rep["params"],
            "agreement": rep["agreement"],
            "search": rep["search"]["chosen"],
            "layout_slim": rep["layout"]["slim"],
            "wall_seconds": wall,
        },
    )


if __name__ == "__main__":
    main()
