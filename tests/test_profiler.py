import math

import pytest
import torch
from torch import nn

from hawada.core.profiler import environment_info, latency_meter, measure_latency_ms, summarize_samples


def test_summary_statistics():
    s = summarize_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0
    assert s["p20_ms"] == pytest.approx(1.8) and s["p80_ms"] == pytest.approx(4.2)
    assert s["ci95_ms"] >= 0
    with pytest.raises(ValueError):
        summarize_samples([])


def test_measures_a_model_and_reports_its_settings():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    x = torch.randn(32, 64)
    r = measure_latency_ms(model, x, warmup=2, min_repeats=5, max_repeats=30, budget_s=0.5)
    assert r.device == "cpu" and r.timer in ("perf_counter", "cpp_steady_clock")
    assert r.shapes == [[32, 64]] and r.dtype == "float32"
    assert 5 <= r.n <= 30 and len(r.samples_ms) == r.n
    assert all(math.isfinite(v) and v > 0 for v in r.samples_ms)
    assert r.p20_ms <= r.median_ms <= r.p80_ms
    d = r.to_dict()
    assert "samples_ms" not in d and d["spread_ms"] == pytest.approx(r.p80_ms - r.p20_ms)


def test_bigger_work_takes_longer():
    small = nn.Linear(64, 64)
    big = nn.Linear(1024, 1024)
    ts = measure_latency_ms(small, torch.randn(8, 64), min_repeats=10, budget_s=0.5).median_ms
    tb = measure_latency_ms(big, torch.randn(512, 1024), min_repeats=10, budget_s=0.5).median_ms
    assert tb > 3 * ts


class NoDevice(nn.Module):
    """A model without parameters or buffers (and so without a device)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


def test_model_without_device_and_kwargs_inputs():
    r = measure_latency_ms(
        NoDevice(), (torch.randn(16, 16), torch.randn(16, 16)), min_repeats=3, budget_s=0.2
    )
    assert r.device == "cpu" and r.shapes == [[16, 16], [16, 16]]
    r2 = measure_latency_ms(NoDevice(), {"a": torch.randn(4, 4), "b": torch.randn(4, 4)}, min_repeats=3)
    assert r2.n >= 3


def test_training_flag_is_restored_and_device_mismatch_is_an_error():
    m = nn.Linear(4, 4).train()
    measure_latency_ms(m, torch.randn(2, 4), min_repeats=2)
    assert m.training
    with pytest.raises(ValueError, match="weights are on cpu"):
        measure_latency_ms(m, torch.randn(2, 4), device="meta")


def test_meter_wraps_what_is_timed():
    seen = []

    def wrap(model):
        seen.append(model)
        return model

    m = nn.Linear(4, 4)
    r = latency_meter(torch.randn(2, 4), "cpu", wrap, min_repeats=2)(m)
    assert seen == [m] and r.n >= 2
    assert "torch" in environment_info()
