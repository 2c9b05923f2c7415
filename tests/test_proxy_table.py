"""The lookup table of the latency proxy: each entry is filed at the width that was timed."""

import pytest
import torch

from hawada.core.gates import GateConfig, GateStore
from hawada.core.proxy_cost import CostTerm, LatencyProxy


def head_proxy(n: int) -> LatencyProxy:
    store = GateStore(GateConfig())
    store.register("heads", "head", n)
    spec = {"batch": 1, "seq": 4, "head_dim": 8}
    return LatencyProxy(store, [CostTerm("attn", "attention", ("heads",), flops=1.0, bytes=1.0, spec=spec)])


def test_a_12_head_table_whose_cost_is_its_width_returns_every_count_exactly():
    """The 9-point grid times 0, 2, 3, 4, 6, 8, 9, 10 and 12 heads (1/8 of 12 heads is 2 heads):
    filed at those widths, a cost equal to the width comes back exact for every head count."""
    proxy = head_proxy(12)
    timed = []
    proxy.measure_table(time_op=lambda op, spec, w: timed.append(w[0]) or float(w[0]))
    assert sorted(timed) == [2, 3, 4, 6, 8, 9, 10, 12]
    for k in range(1, 13):
        assert float(proxy(torch.tensor([float(k)]))) == pytest.approx(k, abs=1e-5), k
    # between timed widths the table is linear in the width: 1 ms per head
    w = torch.tensor([5.0], requires_grad=True)
    proxy(w).backward()
    assert float(w.grad) == pytest.approx(1.0, abs=1e-5)


def test_a_dim_smaller_than_the_grid_times_each_width_once_and_stays_exact():
    proxy = head_proxy(3)  # the grid asks for 0, 0.375, 0.75, ... heads: widths 0..3 repeat
    timed = []
    proxy.measure_table(time_op=lambda op, spec, w: timed.append(w[0]) or 10.0 * w[0] ** 2)
    assert sorted(timed) == [1, 2, 3]
    for k in range(0, 4):
        assert float(proxy(torch.tensor([float(k)]))) == pytest.approx(10.0 * k**2, abs=1e-4), k
