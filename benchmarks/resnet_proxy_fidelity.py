"""Claim (issue 2c): the latency proxy predicts ResNet-18's latency on this CPU (batch 64, 32x32)
within ~5% MAPE with the measured lookup table; analytic vs lut on >= 20 held-out random
sub-architectures, each calibrated on the same measured calibration set."""

from __future__ import annotations

import os
import sys

from common import write_result

from hawada.config import load_recipe
from hawada.run.fidelity import profile_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    points = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    recipe = load_recipe(os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"), ["progress=false"])
    res = profile_recipe(recipe, fidelity=True, points=points)
    write_result("resnet18_proxy_fidelity", {"model": "resnet18", "input": [64, 3, 32, 32], **res})


if __name__ == "__main__":
    main()
