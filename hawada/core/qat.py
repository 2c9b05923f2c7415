"""Quantization-aware training of a plain model for a dynamic-int8 runtime (docs/DESIGN.md,
"Runtimes").

Inside :func:`quantization_aware` every non-empty ``nn.Linear`` computes with fake-quantized
operands, as the deployed int8 model does at run time:

- weights ``[out, in]``: symmetric int8 per output channel (torch.ao's per-channel dynamic
  weights: scale ``max|w_row| / 127.5``, values in ``[-128, 127]``; ONNX Runtime's QInt8:
  ``max|w_row| / 127`` in ``[-127, 127]``, per channel here although ORT's dynamic quantization
  scales per tensor);
- activations ``[..., in]``: asymmetric per tensor, range from the call's own min and max (with 0
  inside it), ``levels + 1`` values: 127 for torch's dynamic int8 (fbgemm quantizes activations
  with a reduced range, 7 bits), 255 for ONNX Runtime's uint8.

With torch's dequantized int8 weights, the fake-quantized activations give torch's dynamic int8
Linear output to float rounding (checked in tests/test_measure_runtime.py).

Both roundings pass the gradient straight through (``x + (q(x) - x).detach()``), so training sees
the deployed model's outputs and updates the fp32 weights the int8 ones are derived from. The
layers' ``forward`` is swapped per instance and restored on exit: parameters, state-dict keys and
the model's class never change.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Int8Scheme:
    """One runtime's dynamic int8: weight scale divisor and range, activation levels."""

    weight_div: float
    weight_min: int
    weight_max: int
    act_levels: int


SCHEMES = {
    "int8_dynamic": Int8Scheme(127.5, -128, 127, 127),
    "onnxruntime_int8": Int8Scheme(127.0, -127, 127, 255),
}
EPS = 1e-12


def fake_quant_weight(w: torch.Tensor, scheme: Int8Scheme = SCHEMES["int8_dynamic"]) -> torch.Tensor:
    """``[out, in]`` weight rounded to symmetric int8 per output channel (straight-through)."""
    scale = w.detach().abs().amax(dim=1, keepdim=True).clamp_min(EPS) / scheme.weight_div
    q = (w.detach() / scale).round().clamp(scheme.weight_min, scheme.weight_max) * scale
    return w + (q - w).detach()


def fake_quant_activation(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``x`` rounded to ``levels + 1`` values spanning its own range and 0, one scale and zero
    point for the whole tensor, as dynamic quantization does per call (straight-through)."""
    xd = x.detach()
    lo, hi = xd.min().clamp(max=0.0), xd.max().clamp(min=0.0)
    scale = ((hi - lo) / levels).clamp_min(EPS)
    zero = (-lo / scale).round()
    q = ((xd / scale).round() + zero).clamp(0, levels)
    return x + ((q - zero) * scale - xd).detach()


def _fake_quant_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    sch = self._hawada_int8
    return F.linear(fake_quant_activation(x, sch.act_levels), fake_quant_weight(self.weight, sch), self.bias)


@contextlib.contextmanager
def quantization_aware(model: nn.Module, scheme: Int8Scheme = SCHEMES["int8_dynamic"]) -> Iterator[int]:
    """Fake-quantize every non-empty ``nn.Linear`` of ``model`` inside the block (yields how many);
    an empty one (a removed FFN or attention) stays fp32, as the runtimes leave it."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.numel() > 0]
    for m in layers:
        m._hawada_int8 = scheme
        m.forward = types.MethodType(_fake_quant_forward, m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward
            del m._hawada_int8


def qat_scheme(qat: str, runtime: str) -> Int8Scheme | None:
    """The int8 scheme quantization-aware fine-tuning fakes, or None when it is off: ``auto`` is on
    for the int8 runtimes; ``on`` with another runtime fakes torch's dynamic int8."""
    if qat == "off" or (qat == "auto" and runtime not in SCHEMES):
        return None
    return SCHEMES.get(runtime, SCHEMES["int8_dynamic"])
