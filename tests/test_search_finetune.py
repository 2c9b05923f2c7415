import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import hawada
from hawada.adapters.base import get_adapter
from hawada.core.finetune import FinetuneConfig, finetune_student, lr_lambda, recalibrate_batchnorm
from hawada.core.profiler import latency_meter
from hawada.core.search_export import choose_trial, grid_search_latency
from tests.helpers import tiny_resnet

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
