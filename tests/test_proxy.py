import pytest
import torch

import hawada
from hawada.core.gates import GateConfig, GateStore
from hawada.core.proxy_cost import GRID, CostTerm, LatencyProxy, mape, set_random_keep, spearman
from tests.helpers import tiny_resnet


def small_store() -> GateStore:
    st = GateStore(GateConfig())
    st.register("a", "block", 16)
    st.register("b", "stage", 32)
    return st


def test_analytic_features_scale_with_kept_fractions():
    st = small_store()
    terms = [
        CostTerm("mm", "linear", ("a", "b"), flops=1e9, bytes=1e6),
        CostTerm("fixed_in", "linear", (8, "b"), flops=2e9, bytes=0.0),
        CostTerm("elt", "norm_act", ("a",), flops=0.0, bytes=4e6),
    ]
    px = LatencyProxy(st, terms, mode="analytic")
    f = px.features(torch.tensor([8.0, 16.0]))  # half of each
    assert f[0] == pytest.approx(1.0 * 0.25 + 2.0 * 0.5)
    assert f[1] == pytest.approx(1.0 * 0.5 + 4.0 * 0.5)
    assert f[2] == 3 and f[3] == 1
    assert px.features(torch.tensor([0.0, 16.0]))[2] == 1  # terms reading a closed segment vanish


def test_calibration_recovers_a_linear_law_and_stays_non_negative():
    st = small_store()
    px = LatencyProxy(st, [CostTerm("mm", "linear", ("a", "b"), flops=1e9, bytes=1e6)], mode="analytic")
    ws = [torch.tensor([a, b]) for a, b in [(16.0, 32.0), (8.0, 32.0), (4.0, 8.0), (12.0, 20.0), (2.0, 30.0)]]
    true = [3.0 * float(px.features(w)[0]) + 0.5 for w in ws]
    fit = px.calibrate(ws, true)
    assert fit["mape"] < 1e-3
    assert (px.coef >= 0).all()
    with torch.no_grad():
        assert float(px(torch.tensor([10.0, 10.0]))) == pytest.approx(
            3.0 * 10 * 10 / (16 * 32) + 0.5, rel=1e-4
        )
    with pytest.raises(ValueError, match="at least two"):
        px.calibrate(ws[:1], true[:1])


def test_non_negativity_is_enforced_where_an_unconstrained_fit_goes_negative():
    """Latency = 3 ms per unit of the FLOPs feature minus 0.4 ms: least squares with an intercept
    fits the intercept -0.4 (a model that gets faster than free as it shrinks). The calibrated
    proxy holds that coefficient at exactly 0 and fits the best line through the origin."""
    st = small_store()
    px = LatencyProxy(st, [CostTerm("mm", "linear", ("a", "b"), flops=1e9, bytes=0.0)], mode="analytic")
    ws = [
        torch.tensor([a, b]) for a, b in [(16.0, 32.0), (12.0, 28.0), (8.0, 24.0), (8.0, 16.0), (6.0, 16.0)]
    ]
    f = torch.tensor([float(px.features(w)[0]) for w in ws], dtype=torch.float64)
    y = 3.0 * f - 0.4
    assert (y > 0).all()
    free = torch.linalg.lstsq(torch.stack([f, torch.ones_like(f)], 1), y.unsqueeze(1)).solution.squeeze(1)
    assert float(free[1]) == pytest.approx(-0.4)  # the unconstrained intercept is negative
    px.calibrate(ws, y.tolist())
    assert (px.coef >= 0).all()
    assert float(px.coef[3]) == 0.0 and float(px.coef[2]) == 0.0  # intercept and per-op cost: held at 0
    # the best non-negative fit is then a pure scale of the FLOPs: slope = <f, y> / <f, f>
    assert float(px.coef[0]) == pytest.approx(float(f @ y / (f @ f)), rel=1e-5)
    # and the fitted latency grows with the widths, down to 0 at nothing kept
    with torch.no_grad():
        lat = [float(px(torch.tensor([a, 2.0 * a]))) for a in (0.0, 4.0, 8.0, 16.0)]
    assert lat[0] == 0.0 and lat == sorted(lat) and lat[1] < lat[-1]


def test_lookup_table_interpolates_and_is_differentiable():
    st = small_store()
    px = LatencyProxy(st, [CostTerm("mm", "linear", ("a", "b"), 1.0, 1.0, {"tokens": 4})], mode="lut")
    g = torch.tensor(GRID)
    with torch.no_grad():
        px.table[0] = 10 * g[:, None] + 100 * g[None, :] ** 2  # known surface on the grid
    px.table_measured = True
    px.coef.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    w = torch.tensor([16 * 0.25, 32 * 0.5])  # exactly on grid points
    assert float(px(w)) == pytest.approx(10 * 0.25 + 100 * 0.25)
    w = torch.tensor([16 * 0.3, 32 * 0.5], requires_grad=True)  # between 0.25 and 0.375 on dim a
    out = px(w)
    assert float(out.detach()) == pytest.approx(10 * 0.3 + 25, rel=1e-5)
    out.backward()
    assert w.grad[0] == pytest.approx(10 / 16, rel=1e-4)


@pytest.fixture
def one_thread():
    """Time tiny ops on one thread: on a busy machine, two threads that wait on each other add
    milliseconds to ops of microseconds, at random, and the table measures that noise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_measured_table_and_calibration_on_a_real_resnet(one_thread):
    model = hawada.attach(tiny_resnet())
    store = hawada.gates(model)
    x = torch.randn(2, 3, 16, 16)
    terms = hawada.adapters.base.get_adapter("resnet").cost_terms(model, x)
    names = {s.name for s in store.segments}
    assert {d for t in terms for d in t.dims if isinstance(d, str)} == names
    px = LatencyProxy(store, terms, mode="lut")
    n = px.measure_table(repeats=2, budget_s=0.05)
    assert n > 0 and (px.table >= 0).all() and px.table.sum() > 0
    full = px.term_ms(store.seg_units)
    half = px.term_ms(store.seg_units / 2)
    assert full.sum() > half.sum()
    # a measured table makes the keep-all model slower than a heavily pruned one
    gen = torch.Generator().manual_seed(0)
    set_random_keep(store, gen, 0.1, 0.3)
    assert float(px(store.open_units())) < float(px(store.seg_units)) + 1e-9


def test_mape_and_spearman():
    assert mape([1.1, 1.8], [1.0, 2.0]) == pytest.approx(10.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def test_unknown_segment_in_a_term_is_an_error():
    with pytest.raises(ValueError, match="unknown segment"):
        LatencyProxy(small_store(), [CostTerm("x", "linear", ("nope", 4), 1, 1)])


def test_unit_costs_weigh_segments_by_their_marginal_latency():
    st = small_store()
    terms = [
        CostTerm("mm", "linear", ("a", 64), flops=4e9, bytes=0.0),  # a: 16 units, 4 GFLOP in all
        CostTerm("mm2", "linear", ("b", 64), flops=1e9, bytes=0.0),  # b: 32 units, 1 GFLOP in all
    ]
    px = LatencyProxy(st, terms, mode="analytic")
    px.coef.copy_(torch.tensor([1.0, 0.0, 0.0, 2.0]))  # 1 ms per GFLOP + 2 ms fixed
    c = px.unit_costs()
    # per unit: a = 4/16 = 0.25 ms, b = 1/32 ms: ratio 8; the mean cost over all 48 units is 1
    assert float(c[0] / c[1]) == pytest.approx(8.0, rel=1e-5)
    assert float((c * torch.tensor([16.0, 32.0])).sum()) == pytest.approx(48.0, rel=1e-5)
    # a proxy that does not depend on the widths gives every unit the same weight
    px.coef.copy_(torch.tensor([0.0, 0.0, 0.0, 2.0]))
    assert torch.equal(px.unit_costs(), torch.ones(2))
