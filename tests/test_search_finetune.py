import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hawada
from hawada.adapters.base import get_adapter
from hawada.core.export import keep_counts, param_count
from hawada.core.finetune import FinetuneConfig, finetune_student, lr_lambda, recalibrate_batchnorm
from hawada.core.profiler import latency_meter
from hawada.core.search_export import (
    Judge,
    SearchConfig,
    choose_trial,
    closed_gates_by_logit,
    grid_search_latency,
    open_gates_by_logit,
    search_export,
)
from tests.helpers import latency_result, tiny_resnet

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def gated_random(seed=0):
    g = hawada.attach(copy.deepcopy(tiny_resnet()))
    st = hawada.gates(g)
    with torch.no_grad():
        st.logits.copy_(torch.randn(len(st), generator=torch.Generator().manual_seed(seed)))
        for s in st.segments:
            st.logits[s.start] = 1.0
    return g.eval()


def test_grid_search_measures_every_combination():
    g = gated_random()
    meter = latency_meter(X, "cpu", min_repeats=3, max_repeats=5, budget_s=0.1)
    res = grid_search_latency(g, 1e9, meter, multiples=(1, 8, 32), modes=("floor", "ceil"))
    assert [(t["multiple"], t["mode"]) for t in res.trials] == [
        (1, "floor"),
        (1, "ceil"),
        (8, "floor"),
        (8, "ceil"),
        (32, "floor"),
        (32, "ceil"),
    ]
    assert all(t["median_ms"] > 0 and t["within_target"] for t in res.trials)
    assert res.met_target
    # everything is within a huge target: the most gate mass wins, i.e. rounding up
    assert res.best["mode"] == "ceil" and res.best["gate_mass"] == max(t["gate_mass"] for t in res.trials)
    slim = hawada.export(g, res.policy)
    assert slim.fc.in_features % res.best["multiple"] == 0 or slim.fc.in_features == 512


def test_choose_trial_rules():
    t = lambda ms, mass, ok: {"median_ms": ms, "gate_mass": mass, "within_target": ok}  # noqa: E731
    best, met = choose_trial([t(5, 0.9, False), t(3, 0.5, True), t(4, 0.7, True), t(2, 0.7, True)])
    assert met and best["median_ms"] == 2  # most mass within target, then faster
    best, met = choose_trial([t(5, 0.9, False), t(4, 0.5, False)])
    assert not met and best["median_ms"] == 4  # none within target: the fastest
    with pytest.raises(ValueError):
        choose_trial([])


class ParamMeter:
    """A deterministic stand-in for the latency meter: 1 ms per 1000 parameters."""

    def __call__(self, model):
        return latency_result(param_count(model) / 1000.0)


def test_closed_gates_come_highest_logit_first_within_and_across_segments():
    g = gated_random()
    st = hawada.gates(g)
    counts = keep_counts(st)
    cands = closed_gates_by_logit(st, counts)
    assert len(cands) == sum(s.count for s in st.segments) - sum(
        -(-counts[s.name] // s.group_size) for s in st.segments
    )
    lg = {
        s.name: torch.sort(st.logits[s.start : s.stop].detach(), descending=True).values for s in st.segments
    }
    seen: dict[str, int] = {}
    last = float("inf")
    for name, k in cands:
        s = st.segment(name)
        j = -(-counts[name] // s.group_size) + seen.get(name, 0)
        seen[name] = seen.get(name, 0) + 1
        assert k == min(s.units, (j + 1) * s.group_size)  # counts grow gate by gate
        assert float(lg[name][j]) <= last  # highest logit first over all segments
        last = float(lg[name][j])


def test_fill_reopens_gates_up_to_the_target_and_no_further():
    g = gated_random()
    meter = ParamMeter()
    floor = grid_search_latency(g, 1e9, meter, multiples=(1,), modes=("floor",))
    full = meter(hawada.export_keepall(g)).median_ms
    target = (floor.best["median_ms"] + full) / 2
    res = search_export(g, target, meter, SearchConfig(multiples=[1], modes=["floor"], fill_probes=12))
    fills = [t for t in res.trials if t["mode"] == "fill"]
    assert fills and res.best["mode"] == "fill" and res.met_target
    assert floor.best["median_ms"] < res.best["median_ms"] <= target
    assert res.best["reopened"] == max(t["reopened"] for t in fills if t["within_target"])
    # the binary search converged: one more reopened gate would have been over the target
    over = [t["reopened"] for t in fills if not t["within_target"]]
    assert over and min(over) == res.best["reopened"] + 1
    slim = hawada.export(g, res.policy)  # the export check holds for the filled keep set
    assert meter(slim).median_ms == res.best["median_ms"]
    # no fill when the grid itself is over the target
    none = search_export(g, 1e-3, meter, SearchConfig(multiples=[1], modes=["floor"], fill_probes=4))
    assert not none.met_target and all(t["mode"] != "fill" for t in none.trials)


def test_open_gates_come_lowest_logit_first_and_stop_at_min_keep():
    g = gated_random()
    st = hawada.gates(g)
    counts = keep_counts(st)
    cands = open_gates_by_logit(st, counts)
    assert len(cands) == sum(max(0, -(-counts[s.name] // s.group_size) - s.min_keep) for s in st.segments)
    lg = {
        s.name: torch.sort(st.logits[s.start : s.stop].detach(), descending=True).values for s in st.segments
    }
    seen: dict[str, int] = {}
    last = -float("inf")
    for name, k in cands:
        s = st.segment(name)
        j = -(-counts[name] // s.group_size) - 1 - seen.get(name, 0)
        seen[name] = seen.get(name, 0) + 1
        assert j >= s.min_keep and k == min(s.units, j * s.group_size)  # counts shrink gate by gate
        assert float(lg[name][j]) >= last  # lowest logit first over all segments
        last = float(lg[name][j])


def test_trim_closes_gates_down_to_the_target_and_no_further():
    g = gated_random()
    st = hawada.gates(g)
    meter = ParamMeter()
    floor = grid_search_latency(g, 1e9, meter, multiples=(1,), modes=("floor",))
    target = 0.8 * floor.best["median_ms"]  # the trained keep set is over the target
    res = search_export(g, target, meter, SearchConfig(multiples=[1], modes=["floor"], fill_probes=12))
    trims = [t for t in res.trials if t["mode"] == "trim"]
    assert trims and res.best["mode"] == "trim" and res.met_target
    assert res.best["median_ms"] <= target < floor.best["median_ms"]
    assert res.best["closed"] == min(t["closed"] for t in trims if t["within_target"])
    # the binary search converged: one gate fewer closed would have been over the target
    under = [t["closed"] for t in trims if not t["within_target"]]
    assert under and max(under) == res.best["closed"] - 1
    slim = hawada.export(g, res.policy)  # the export check holds for the trimmed keep set
    assert meter(slim).median_ms == res.best["median_ms"]
    counts = keep_counts(st, res.policy)
    assert all(counts[s.name] >= min(s.units, s.min_keep * s.group_size) for s in st.segments)
    # a target below the smallest allowed keep set: trimmed to it, and reported as not met
    none = search_export(g, 1e-3, meter, SearchConfig(multiples=[1], modes=["floor"], fill_probes=12))
    assert not none.met_target and none.best["mode"] == "trim"
    assert none.best["closed"] == len(open_gates_by_logit(st, keep_counts(st, floor.policy)))


class DriftMeter:
    """1 ms per 1000 parameters times a load that grows 4 % with every call (a machine getting
    busier while the search runs)."""

    def __init__(self):
        self.load = 1.0

    def __call__(self, model):
        ms = param_count(model) / 1000.0 * self.load
        self.load *= 1.04
        return latency_result(ms)


def test_a_ratio_target_is_judged_against_keep_all_timed_next_to_each_export():
    g = gated_random()
    full = hawada.export_keepall(g)
    keep_ms = param_count(full) / 1000.0
    res = search_export(
        g,
        0.5 * keep_ms,
        DriftMeter(),
        SearchConfig(multiples=[1], modes=["floor"], fill_probes=12),
        reference=full,
        ratio=0.5,
    )
    assert res.met_target and len(res.trials) > 3
    for t in res.trials:  # each trial: keep-all then the export, the limit from that keep-all
        assert t["limit_ms"] == pytest.approx(0.5 * t["reference_ms"])
        assert t["within_target"] == (t["median_ms"] <= t["limit_ms"])
    # the chosen export is within half of keep-all up to one call's drift, although the load
    # has grown far beyond that since the first trial
    assert param_count(hawada.export(g, res.policy)) <= 0.5 * 1.04 * param_count(full)
    assert res.trials[-1]["reference_ms"] > 1.3 * keep_ms
    with pytest.raises(ValueError, match="go together"):
        Judge(1.0, DriftMeter(), reference=full)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_lambda(0, 10, 100) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100) == pytest.approx(1.0)
    assert lr_lambda(10, 10, 100) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100) == pytest.approx(0.5)
    assert lr_lambda(100, 10, 100) == pytest.approx(0.0, abs=1e-9)


def loader():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 3, 16, 16, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, torch.zeros(32, dtype=torch.long)), batch_size=8, shuffle=False)


def test_batchnorm_recalibration_matches_the_data():
    m = tiny_resnet()
    n = recalibrate_batchnorm(m, loader(), get_adapter("resnet").model_inputs, 4, torch.device("cpu"))
    assert n == sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    x = torch.cat([b[0] for b in loader()])
    y = m.bn1(m.conv1(x))  # the stem BN has seen exactly these inputs
    assert torch.allclose(m.bn1.running_mean, m.conv1(x).mean((0, 2, 3)), atol=1e-4)
    assert not m.training and y.shape[1] == m.bn1.num_features


def test_finetune_keeps_the_best_checkpoint_and_improves_agreement():
    teacher = tiny_resnet()
    slim = hawada.export(gated_random(1))
    ad = get_adapter("resnet")
    val = next(iter(loader()))[0]

    def score(model):
        with torch.no_grad():
            return -float(torch.nn.functional.mse_loss(model.eval()(val), teacher(val)))

    start = score(copy.deepcopy(slim))
    cfg = FinetuneConfig(
        steps=12, lr=3e-3, warmup_steps=2, eval_every=4, bn_recalib_batches=2, progress=False
    )
    best, hist = finetune_student(slim, teacher, ad, loader(), cfg, evaluate=score)
    evals = [h["eval"] for h in hist if "eval" in h]
    assert [h["step"] for h in hist if "eval" in h] == [0, 4, 8, 12]
    assert score(best) == pytest.approx(max(evals), rel=1e-4)
    assert max(evals) > start
