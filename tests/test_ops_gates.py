"""Store ops (gate_sample, gate_probs, gate_penalties, project_gates): Triton under the interpreter
and the torch path vs plain torch formulas (autograd through stock ops), on a store with odd
segments; GateStore's methods go through the ops on either backend."""

from __future__ import annotations

import math

import pytest
import torch

from hawada.core.gates import (
    GateConfig,
    GateStore,
    PenaltyWeights,
    combined_penalty,
    project_gates_into_constraints,
)
from hawada.ops import (
    SegmentTable,
    gate_penalties,
    gate_probs,
    gate_sample,
    project_gates,
    use_backend,
)
from tests.helpers import project_per_segment

MODES = ["hard_concrete", "sigmoid", "ste"]


def make_store(mode: str = "hard_concrete", device: str = "cpu", layers: int = 3) -> GateStore:
    """Odd segments: length 1, short last groups, group sizes 1, 16, 128; random logits and costs."""
    store = GateStore(GateConfig(mode=mode, tau=0.7, min_keep={"head": 2, "ffn": 3}))
    for i in range(layers):
        store.register(f"l{i}.heads", "head", 7, 1, layer=i)
        store.register(f"l{i}.ffn", "ffn", 1000 + 37 * i, 16, layer=i)
        store.register(f"l{i}.wide", "ffn", 300, 128, layer=i)
        store.register(f"l{i}.one", "block", 5, 8, layer=i, min_keep=1)  # a one-gate segment
        store.register(f"l{i}.stage", "stage", 3, 1, layer=i)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        store.logits.copy_(torch.randn(len(store), generator=g) * 3)
    store.set_segment_costs(torch.rand(store.num_segments, generator=g) + 0.1)
    return store.to(device)


def table(store: GateStore) -> SegmentTable:
    return SegmentTable(store.seg_id, store.gate_size, store.seg_start, store.seg_units, store.seg_min_keep)


# ---------------------------------------------------------------------- plain references
def plain_probs(store: GateStore) -> torch.Tensor:
    lg, tau = store.logits, store.tau
    if store.config.mode == "hard_concrete":
        return torch.sigmoid(lg)
    return torch.sigmoid(lg / tau)


def plain_sample(store: GateStore, noise: torch.Tensor) -> torch.Tensor:
    lg, tau, mode = store.logits, store.tau, store.config.mode
    if mode == "sigmoid":
        return torch.sigmoid(lg / tau)
    if mode == "ste":
        p = torch.sigmoid(lg / tau)
        return (noise < p).to(lg.dtype) + p - p.detach()
    gamma, zeta = store.config.stretch
    u = noise.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + lg + tau * math.log(-gamma / zeta)) / tau)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def plain_penalties(store: GateStore, w: PenaltyWeights) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``([l0, floor, bimodal], expected_units [S])``."""
    p = plain_probs(store)
    exp_u = p.new_zeros(store.num_segments).index_add(0, store.seg_id, p * store.gate_size)
    cw = store.gate_size * (store.seg_cost[store.seg_id] if w.cost_weighted else 1.0)
    l0 = (p * cw).sum() / cw.sum()
    short = torch.relu(w.floor_frac * store.seg_units - exp_u) / store.seg_units
    return [l0, (short * short).mean(), (p * (1 - p)).mean()], exp_u


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_store_has_the_odd_cases():
    s = make_store()
    counts = [seg.count for seg in s.segments]
    assert 1 in counts and any(seg.units % seg.group_size for seg in s.segments)
    assert {seg.group_size for seg in s.segments} >= {1, 16, 128}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_sample_and_probs_match_core(backend, mode):
    store = make_store(mode)
    noise = torch.rand(len(store), generator=torch.Generator().manual_seed(2))
    noise[:5] = torch.tensor([0.0, 1.0, 1e-7, 1 - 1e-7, 0.5])  # the clamp's edges
    gz = torch.randn(len(store))
    z_ref = plain_sample(store, noise)
    (g_ref,) = torch.autograd.grad(z_ref, store.logits, gz)
    p_ref = plain_probs(store)
    (gp_ref,) = torch.autograd.grad(p_ref, store.logits, gz)
    with use_backend(backend):
        z = gate_sample(store.logits, noise, store.tau, mode, store.config.stretch)
        (g,) = torch.autograd.grad(z, store.logits, gz)
        p = gate_probs(store.logits, store.tau, mode, store.config.stretch)
        (gp,) = torch.autograd.grad(p, store.logits, gz)
    assert rel(z, z_ref) <= 1e-5 and rel(g, g_ref) <= 1e-5
    assert rel(p, p_ref) <= 1e-5 and rel(gp, gp_ref) <= 1e-5
    with use_backend(backend):  # the store's methods are these ops
        assert torch.equal(store.sample(noise), z) and torch.equal(store.probs(), p)
    if mode == "ste":
        assert set(z.detach().round().unique().tolist()) <= {0.0, 1.0}
    if mode == "hard_concrete":
        assert (z == 0).any() and (z == 1).any()  # the stretch reaches both ends


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["hard_concrete", "sigmoid"])
@pytest.mark.parametrize("cost_weighted", [True, False])
def test_penalties_match_core(backend, mode, cost_weighted):
    store = make_store(mode)
    w = PenaltyWeights(l0=0.7, floor=3.0, floor_frac=0.4, bimodal=0.3, cost_weighted=cost_weighted)
    with torch.no_grad():
        store.logits[store.seg_start[1] : store.seg_start[2]] = -4.0  # a segment below its floor
    gexp = torch.randn(store.num_segments)
    terms_ref, exp_ref = plain_penalties(store, w)
    total_ref = w.l0 * terms_ref[0] + w.floor * terms_ref[1] + w.bimodal * terms_ref[2]
    (g_ref,) = torch.autograd.grad(total_ref + (exp_ref * gexp).sum(), store.logits, retain_graph=True)
    (g_l0_ref,) = torch.autograd.grad(terms_ref[0], store.logits)
    assert terms_ref[1] > 0  # the floor term is active
    with use_backend(backend):
        out = gate_penalties(
            store.logits, table(store), store.seg_cost, store.tau, w, mode, store.config.stretch
        )
        (g,) = torch.autograd.grad(
            out.total + (out.expected_units * gexp).sum(), store.logits, retain_graph=True
        )
        (g_l0,) = torch.autograd.grad(out.l0, store.logits)
    for a, r in zip((out.l0, out.floor, out.bimodal), terms_ref):
        assert rel(a, r) <= 1e-5
    assert rel(out.total, total_ref) <= 1e-5
    assert rel(out.expected_units, exp_ref) <= 1e-5
    assert rel(g, g_ref) <= 1e-5 and rel(g_l0, g_l0_ref) <= 1e-5
    with use_backend(backend):  # the store's methods are this op
        assert torch.equal(combined_penalty(store, w), out.total)
        assert torch.equal(store.expected_units(), out.expected_units)


def _project_case(store: GateStore) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    lg = torch.randn(len(store), generator=g) * 8 - 6  # mostly closed, some beyond the clip
    lg[:4] = -20.0
    lg[10:14] = -1.0  # ties inside a segment: stable order decides
    lg[7] = 15.0
    return lg


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_project_matches_plain(backend):
    store = make_store()
    start = _project_case(store)
    expected = project_per_segment(start, store, 0.05)
    with torch.no_grad():
        store.logits.copy_(start)
    with use_backend(backend):
        project_gates_into_constraints(store, margin=0.05)
    assert torch.equal(store.logits.detach(), expected)
    lg = start.clone()
    mk = store.seg_min_keep
    with use_backend(backend):
        project_gates(lg, table(store), mk, store.config.logit_clip, 0.05)
    assert torch.equal(lg, expected)
    # the constraint holds and only what had to change changed
    for s in store.segments:
        seg = lg[s.start : s.stop]
        assert int((seg >= 0.05).sum()) >= s.min_keep
    assert lg.abs().max() <= store.config.logit_clip
    assert (lg != start.clamp(-10, 10)).sum() > 0


def test_core_store_routes_through_triton_and_agrees():
    """GateStore methods with HAWADA_BACKEND=triton (interpreter) equal the torch path."""
    store = make_store()
    w = PenaltyWeights(l0=1.0, floor=2.0, floor_frac=0.3, bimodal=0.5)
    noise = torch.rand(len(store))
    res = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            z = store.sample(noise)
            pen = combined_penalty(store, w)
            exp_u = store.expected_units()
            (g,) = torch.autograd.grad((z * noise).sum() + pen + exp_u.sum(), store.logits)
            s2 = make_store()
            with torch.no_grad():
                s2.logits.copy_(_project_case(s2))
            project_gates_into_constraints(s2)
            res[backend] = (z.detach(), pen.detach(), exp_u.detach(), g, s2.logits.detach().clone())
    for a, r in zip(res["triton"][:4], res["torch"][:4]):
        assert rel(a, r) <= 1e-5
    assert torch.equal(res["triton"][4], res["torch"][4])


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_store_ops_match_torch(mode):
    store = make_store(mode, device="cuda", layers=32)
    w = PenaltyWeights(l0=0.7, floor=3.0, floor_frac=0.4, bimodal=0.3)
    noise = torch.rand(len(store), device="cuda")
    out = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            z = gate_sample(store.logits, noise, store.tau, mode)
            t = gate_penalties(store.logits, table(store), store.seg_cost, store.tau, w, mode)
            (g,) = torch.autograd.grad(z.sum() + t.total + t.expected_units.sum(), store.logits)
            lg = store.logits.detach().clone() * 4 - 3
            project_gates(lg, table(store), store.seg_min_keep)
            out[backend] = (z.detach(), t.total.detach(), t.expected_units.detach(), g, lg)
    for a, r in zip(out["triton"][:4], out["torch"][:4]):
        assert rel(a, r) <= 1e-5
    assert torch.equal(out["triton"][4], out["torch"][4])
