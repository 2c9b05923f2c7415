import math
import time

import pytest
import torch
from torch import nn

from hawada.core.profiler import (
    environment_info,
    latency_meter,
    measure_latency_ms,
    measure_pooled,
    relative_meter,
    summarize_samples,
)
from tests.helpers import latency_result


def test_summary_statistics_on_known_samples():
    s = summarize_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median_ms"] == 3.0 and s["min_ms"] == 1.0
    assert s["p20_ms"] == pytest.approx(1.8) and s["p80_ms"] == pytest.approx(4.2)
    # 1..101 in a shuffled order: the k-th percentile is 1 + k, the mean 51, the (population)
    # standard deviation sqrt((n^2 - 1) / 12) of n consecutive integers
    xs = [float(v) for v in torch.randperm(101, generator=torch.Generator().manual_seed(0)) + 1]
    s = summarize_samples(xs)
    assert (s["min_ms"], s["p20_ms"], s["median_ms"], s["p80_ms"]) == (1.0, 21.0, 51.0, 81.0)
    assert s["mean_ms"] == pytest.approx(51.0) and s["std_ms"] == pytest.approx(math.sqrt((101**2 - 1) / 12))
    assert 0 < s["ci95_ms"] < s["p80_ms"] - s["p20_ms"]
    # shifting every sample shifts the location statistics and leaves the spreads alone;
    # scaling scales all of them
    shifted, scaled = summarize_samples([x + 7.0 for x in xs]), summarize_samples([3.0 * x for x in xs])
    for k in ("median_ms", "p20_ms", "p80_ms", "mean_ms", "min_ms"):
        assert shifted[k] == pytest.approx(s[k] + 7.0) and scaled[k] == pytest.approx(3.0 * s[k])
    for k in ("std_ms", "ci95_ms"):
        assert shifted[k] == pytest.approx(s[k]) and scaled[k] == pytest.approx(3.0 * s[k])
    const = summarize_samples([2.5] * 9)
    assert const["ci95_ms"] == 0.0 and const["std_ms"] == 0.0 and const["p20_ms"] == const["p80_ms"] == 2.5
    with pytest.raises(ValueError):
        summarize_samples([])


def test_median_interval_covers_the_true_median_and_narrows_with_more_samples():
    """Samples of a known distribution (uniform on [0, 1): median 0.5): the reported 95% interval
    of the median covers it about 95% of the time, and 16x the samples make it about 4x narrower."""
    g = torch.Generator().manual_seed(0)

    def draws(n: int, trials: int = 400) -> list[dict]:
        return [summarize_samples(torch.rand(n, generator=g).tolist()) for _ in range(trials)]

    small, large = draws(25), draws(400)
    for runs in (small, large):
        covered = sum(abs(s["median_ms"] - 0.5) <= s["ci95_ms"] for s in runs) / len(runs)
        assert 0.9 <= covered <= 0.99, covered
    width_small = sum(s["ci95_ms"] for s in small) / len(small)
    width_large = sum(s["ci95_ms"] for s in large) / len(large)
    assert 3.0 < width_small / width_large < 5.5


class Sleeper(nn.Module):
    """Sleeps ``durations_ms[i % len]`` on its i-th call: a model whose latency is known."""

    def __init__(self, durations_ms: list[float]) -> None:
        super().__init__()
        self.durations_ms, self.calls = durations_ms, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.durations_ms[self.calls % len(self.durations_ms)] / 1e3)
        self.calls += 1
        return x


def test_statistics_of_a_model_with_known_durations():
    """Ten calls cycling through 10..50 ms: each duration twice, so the statistics are those of
    the ideal samples, plus what sleeping and calling add (never less: sleep never returns early)."""
    durations = [10.0, 20.0, 30.0, 40.0, 50.0]
    r = measure_latency_ms(
        Sleeper(durations), torch.zeros(1), warmup=0, min_repeats=10, max_repeats=10, timer="python"
    )
    assert r.n == 10 and r.timer == "perf_counter"
    ideal = summarize_samples(durations * 2)
    for k in ("min_ms", "p20_ms", "median_ms", "p80_ms", "mean_ms"):
        assert ideal[k] <= getattr(r, k) < ideal[k] + 6.0, (k, getattr(r, k), ideal[k])


def test_stops_when_the_median_is_precise_or_the_budget_is_spent():
    # a steady 20 ms: the interval of the median is soon within 25 % of it (sleeping overshoots by
    # a few ms at most, even on a busy machine), long before 100 calls
    r = measure_latency_ms(
        Sleeper([20.0]), torch.zeros(1), warmup=0, min_repeats=5, max_repeats=100, budget_s=30.0, rel_ci=0.25
    )
    assert 5 <= r.n < 100 and r.ci95_ms <= 0.25 * r.median_ms
    # never precise enough (rel_ci 0): the 0.2 s budget stops it; every call takes >= 20 ms, so
    # the budget is spent after at most 11 calls
    r = measure_latency_ms(
        Sleeper([20.0]), torch.zeros(1), warmup=0, min_repeats=5, max_repeats=1000, budget_s=0.2, rel_ci=0.0
    )
    assert 5 <= r.n <= 11


def test_pooled_measurement_interleaves_and_pools_every_round():
    order: list[str] = []

    def meter(model: nn.Module):
        order.append(model.name)
        k = order.count(model.name)
        return latency_result([model.base + k, model.base + 10 * k])  # two samples per call

    a, b = nn.Identity(), nn.Identity()
    a.name, a.base, b.name, b.base = "a", 1.0, "b", 100.0
    ra, rb = measure_pooled([a, b], meter, rounds=3)
    assert order == ["a", "b"] * 3  # A B A B A B: load that comes and goes lands on both alike
    assert ra.n == rb.n == 6
    assert sorted(ra.samples_ms) == sorted([1.0 + k for k in (1, 2, 3)] + [1.0 + 10 * k for k in (1, 2, 3)])
    assert ra.median_ms == summarize_samples(ra.samples_ms)["median_ms"]
    assert rb.p80_ms == summarize_samples(rb.samples_ms)["p80_ms"]


def test_relative_meter_cancels_a_drifting_clock():
    """A machine that slows by 10% per call: the plain meter reads the same model differently
    each time; the relative meter gives reference_ms x (model / reference) every time."""
    calls = [0]

    def drifting(model: nn.Module):
        calls[0] += 1
        speed = 1.1 ** calls[0]
        return latency_result([model.cost * speed] * 3)

    ref, half = nn.Identity(), nn.Identity()
    ref.cost, half.cost = 40.0, 20.0
    plain = [drifting(half).median_ms for _ in range(3)]
    assert max(plain) / min(plain) > 1.2  # the drift the relative meter must remove
    rel = relative_meter(drifting, ref, reference_ms=100.0)
    got = [rel(half) for _ in range(3)]
    for r in got:
        # reference and model share each round's speed up to one call's drift (x1.1)
        assert 50.0 <= r.median_ms <= 55.0 + 1e-9
        assert r.n == 3 and r.samples_ms == [r.median_ms] * 3
    assert max(g.median_ms for g in got) == pytest.approx(min(g.median_ms for g in got))
    assert relative_meter(drifting, ref, 100.0, rounds=2)(ref).median_ms == pytest.approx(
        100.0 * 1.1, rel=1e-9
    )  # the model is timed right after the reference in each round: one call of drift


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
