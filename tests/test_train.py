import copy

import pytest
import torch

import hawada
from hawada.adapters.base import get_adapter
from hawada.core.calibrate import calibration_logits, measure_subarchs
from hawada.core.distill import KDConfig, distill_loss
from hawada.core.gates import PenaltyWeights
from hawada.core.profiler import latency_meter
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.train import LagrangeTrainer, TrainConfig, make_latency_probe
from tests.helpers import tiny_resnet

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))


def setup(mode="sigmoid", **cfg_kw):
    teacher = tiny_resnet()
    student = hawada.attach(copy.deepcopy(teacher), hawada.GateConfig(mode=mode))
    store = hawada.gates(student)
    terms = get_adapter("resnet").cost_terms(student, X)
    proxy = LatencyProxy(store, terms, mode="analytic")
    meter = latency_meter(X, "cpu", min_repeats=3, max_repeats=10, budget_s=0.2)
    calib = measure_subarchs(student, calibration_logits(student, 3, 0), meter)
    proxy.calibrate([w for w, _ in calib], [m for _, m in calib])
    cfg = TrainConfig(progress=False, **cfg_kw)
    return teacher, student, store, proxy, meter, calib, cfg


def test_one_pass_weight_gradient_is_exactly_the_kd_gradient():
    teacher, student, store, proxy, meter, calib, cfg = setup(
        "sigmoid", steps=5, lr_weights=0.0, penalties=PenaltyWeights(l0=1.0, floor=1.0, bimodal=1.0)
    )
    tr = LagrangeTrainer(student, teacher, proxy, target_ms=1e-3, cfg=cfg)
    tr.lam.fill_(5.0)
    ref = copy.deepcopy(student).train()
    kd = distill_loss(ref(X), teacher(X).detach(), KDConfig(), "logits")
    kd.backward()
    student.train()
    pen, lat, _ = tr._gate_terms(1e-3)
    (distill_loss(student(X), teacher(X).detach(), KDConfig(), "logits") + pen + lat).backward()
    for (n, p), (_, q) in zip(student.named_parameters(), ref.named_parameters(), strict=True):
        if n == "hawada_gates.logits":
            assert p.grad is not None and not torch.allclose(p.grad, q.grad)
            continue
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), n


def test_lambda_rises_above_target_and_gates_close():
    teacher, student, store, proxy, meter, calib, cfg = setup(
        "hard_concrete", steps=25, lr_gates=0.2, lambda_lr=2.0, probe_every=0
    )
    # latency that follows the kept units, not this machine's (noisy, possibly loaded) timings:
    # the test is about the multiplier, not about the measurements
    full = float(store.seg_units.sum())
    proxy.calibrate([w for w, _ in calib], [1.0 + 10.0 * float(w.sum()) / full for w, _ in calib])
    keepall_ms = float(proxy(store.seg_units))
    tr = LagrangeTrainer(student, teacher, proxy, target_ms=0.4 * keepall_ms, cfg=cfg)
    hist = tr.fit([(X, Y)])
    assert hist[0]["lambda"] > 0
    assert max(h["lambda"] for h in hist) > 1.0
    assert hist[-1]["proxy_ms"] < 0.8 * hist[0]["proxy_ms"]
    assert hist[-1]["kept"] < 1.0


def test_lambda_stays_at_zero_below_target_and_ramp_moves_the_target():
    teacher, student, store, proxy, meter, calib, cfg = setup(steps=4, target_ramp_steps=10, probe_every=0)
    keepall_ms = float(proxy(store.seg_units))
    tr = LagrangeTrainer(student, teacher, proxy, target_ms=10 * keepall_ms, cfg=cfg)
    tr.fit([(X, Y)])
    assert all(h["lambda"] == 0.0 for h in tr.history)
    assert tr.target_at(0) == pytest.approx(keepall_ms, rel=1e-4)
    assert tr.target_at(5) == pytest.approx(keepall_ms + (10 * keepall_ms - keepall_ms) / 2, rel=1e-4)
    assert tr.target_at(10) == pytest.approx(10 * keepall_ms)


def test_probes_measure_the_export_and_recalibrate_the_proxy():
    teacher, student, store, proxy, meter, calib, cfg = setup(steps=4, probe_every=2)
    n0 = len(calib)
    tr = LagrangeTrainer(
        student, teacher, proxy, 0.5, cfg, probe=make_latency_probe(student, meter), calibration=calib
    )
    tr.fit([(X, Y)])
    probed = [h for h in tr.history if "real_ms" in h]
    assert [h["step"] for h in probed] == [2, 4]
    assert all(h["real_ms"] > 0 for h in probed)
    assert len(calib) == n0 + 2 and len(proxy.calibration) == n0 + 2


def test_alternating_mode_and_projection_keep_streams_open():
    teacher, student, store, proxy, meter, calib, cfg = setup(
        "ste", steps=3, alternating=True, lr_gates=5.0, lambda_lr=50.0, probe_every=0
    )
    tr = LagrangeTrainer(student, teacher, proxy, 1e-6, cfg)
    w0 = student.fc.weight.detach().clone()
    tr.fit([(X, Y)])
    assert not torch.equal(w0, student.fc.weight)
    for s in store.segments:
        if s.kind == "stage":
            assert int((store.logits[s.start : s.stop] > 0).sum()) >= 1


def test_bad_target_and_config():
    teacher, student, store, proxy, meter, calib, cfg = setup(steps=1)
    with pytest.raises(ValueError, match="target latency"):
        LagrangeTrainer(student, teacher, proxy, 0.0, cfg)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="int8")
