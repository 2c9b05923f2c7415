import math

import pytest
import torch

from hawada.core.gates import (
    GateConfig,
    GateStore,
    PenaltyWeights,
    combined_penalty,
    expand_to_units,
    penalty_terms,
    project_gates_into_constraints,
)
from hawada.ops import GATE_MODES, gate_sample
from tests.helpers import project_per_segment


def make_store(mode: str = "hard_concrete", **kw) -> GateStore:
    st = GateStore(GateConfig(mode=mode, **kw))
    st.register("a", "block", units=10, group_size=3, layer=0)  # 4 gates, last covers 1 unit
    st.register("b", "stage", units=5, group_size=1, layer=1)
    st.register("c", "head", units=1, group_size=1, layer=2)  # a segment of length 1
    return st


def test_segments_share_one_flat_parameter():
    st = make_store()
    assert isinstance(st.logits, torch.nn.Parameter) and st.logits.dim() == 1
    assert len(st) == 4 + 5 + 1
    a, b, c = st.segments
    assert (a.start, a.count, a.group_size, a.units) == (0, 4, 3, 10)
    assert (b.start, b.count, b.kind, b.layer) == (4, 5, "stage", 1)
    assert c.start == 9 and c.count == 1
    assert a.gate_sizes() == [3, 3, 3, 1]
    assert st.seg_id.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="registered twice"):
        st.register("a", "block", 3)


def test_stage_keeps_at_least_one_gate():
    st = GateStore(GateConfig(min_keep={"block": 2}))
    blk = st.register("x", "block", 8)
    stg = st.register("s", "stage", 8)
    assert blk.min_keep == 2 and stg.min_keep == 1


@pytest.mark.parametrize("mode", ["hard_concrete", "ste"])
def test_probs_is_the_sampling_distribution(mode):
    """Invariant 3: P(gate > 0) under sample() equals probs()."""
    st = make_store(mode)
    with torch.no_grad():
        st.logits.copy_(torch.linspace(-3, 3, len(st)))
    n = 40000
    hits = torch.zeros(len(st))
    for _ in range(n // 1000):
        noise = torch.rand(1000, len(st))
        z = torch.stack([st.sample(u) for u in noise])
        hits += (z > 0).float().sum(0)
    freq = hits / n
    assert torch.allclose(freq, st.probs().detach(), atol=0.015)


def test_sigmoid_mode_is_deterministic_and_consistent():
    st = make_store("sigmoid", tau=0.5)
    with torch.no_grad():
        st.logits.normal_()
    z = st.sample()
    assert torch.equal(z, st.probs())
    assert torch.allclose(z, torch.sigmoid(st.logits / 0.5))


def test_hard_concrete_probability_formula():
    st = make_store("hard_concrete", tau=0.5, stretch=(-0.1, 1.1))
    with torch.no_grad():
        st.logits.normal_()
    # the logit is the log-odds of a non-zero gate, at any temperature
    assert torch.allclose(st.probs(), torch.sigmoid(st.logits))


def test_eval_mode_is_hard_open_iff_logit_positive():
    st = make_store()
    with torch.no_grad():
        st.logits.copy_(torch.tensor([1.0, -1.0, 0.0, 2.0, 0.5, -0.5, 3.0, -3.0, 0.1, -0.1]))
    st.eval()
    st.refresh()
    assert st.gate_mask().tolist() == [1, 0, 0, 1, 1, 0, 1, 0, 1, 0]
    assert st.unit_mask("a").tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    assert st.open_units().tolist() == [4.0, 3.0, 0.0]


@pytest.mark.parametrize("tau", [0.2, 2.0 / 3.0, 1.5])
@pytest.mark.parametrize("stretch", [(-0.1, 1.1), (-0.5, 1.2)])
def test_eval_rule_agrees_with_the_training_distribution(tau, stretch):
    """Invariant 2: a gate is open in eval mode iff the training forward makes it non-zero more
    often than not. 40,000 hard-concrete draws per gate: the non-zero frequency is the store's
    probability (within 4 standard errors) and is above 1/2 exactly for the gates eval keeps open."""
    st = make_store("hard_concrete", tau=tau, stretch=stretch)
    logits = torch.tensor([-3.0, -1.5, -1.0, -0.3, 0.3, 1.0, 1.5, 3.0, -0.6, 0.6])
    with torch.no_grad():
        st.logits.copy_(logits)
    draws = 40_000
    # the store's own sampling op, on every gate repeated ``draws`` times
    noise = torch.rand(draws * len(st), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = gate_sample(logits.repeat(draws), noise, st.tau, "hard_concrete", stretch)
    freq = (z > 0).float().view(draws, len(st)).mean(0)
    p = st.probs().detach()
    se = (p * (1 - p) / draws).sqrt()
    assert torch.all((freq - p).abs() <= 4 * se + 1e-4), (freq, p)
    st.eval()
    st.refresh()
    assert torch.equal(st.gate_mask().bool(), freq > 0.5)


def test_training_forward_samples_once_per_refresh():
    st = make_store()
    st.train()
    st.refresh()
    m1 = st.unit_mask("b")
    assert st.unit_mask("b") is m1
    st.refresh()
    assert not torch.equal(st.unit_mask("b"), m1)


def test_expected_units_and_penalties_match_plain_formulas():
    st = make_store()
    with torch.no_grad():
        st.logits.normal_()
    st.set_segment_costs(torch.tensor([2.0, 1.0, 5.0]))
    p = st.probs()
    sizes = torch.tensor([3, 3, 3, 1, 1, 1, 1, 1, 1, 1.0])
    exp = torch.stack([(p[0:4] * sizes[0:4]).sum(), p[4:9].sum(), p[9:10].sum()])
    assert torch.allclose(st.expected_units(), exp)
    w = PenaltyWeights(l0=2.0, floor=3.0, floor_frac=0.5, bimodal=0.5)
    terms = penalty_terms(st, w)
    cost = torch.tensor([2.0] * 4 + [1.0] * 5 + [5.0])
    assert torch.allclose(terms.l0, (p * sizes * cost).sum() / (sizes * cost).sum())
    uniform = penalty_terms(st, PenaltyWeights(cost_weighted=False)).l0
    assert torch.allclose(uniform, (p * sizes).sum() / sizes.sum())
    units = torch.tensor([10.0, 5.0, 1.0])
    short = torch.relu(0.5 * units - exp) / units
    assert torch.allclose(terms.floor, (short**2).mean())
    assert torch.allclose(terms.bimodal, (p * (1 - p)).mean())
    assert torch.allclose(terms.expected_units, exp)
    total = 2.0 * terms.l0 + 3.0 * terms.floor + 0.5 * terms.bimodal
    assert torch.allclose(terms.total, total)
    assert torch.allclose(combined_penalty(st, w), total)
    combined_penalty(st, w).backward()
    assert st.logits.grad is not None and st.logits.grad.abs().sum() > 0


def test_projection_matches_a_per_segment_loop():
    st = GateStore(GateConfig(min_keep={"block": 2, "head": 3}, logit_clip=4.0))
    for i, (kind, n) in enumerate([("block", 7), ("head", 3), ("stage", 1), ("block", 1), ("stage", 12)]):
        st.register(f"s{i}", kind, n)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        lg = torch.randn(len(st), generator=g) * 5 - 2
        lg[3] = lg[4]  # ties
        with torch.no_grad():
            st.logits.copy_(lg)
        project_gates_into_constraints(st, margin=0.05)
        assert torch.equal(st.logits.detach(), project_per_segment(lg, st, 0.05))
        open_per_seg = st.segment_sum((st.logits > 0).float())
        assert (open_per_seg >= st.seg_min_keep.float()).all()


def test_anneal_and_config_validation():
    st = GateStore(GateConfig(tau=1.0, tau_final=0.1))
    st.anneal(0, 10)
    assert float(st.tau) == pytest.approx(1.0)
    st.anneal(5, 10)
    assert float(st.tau) == pytest.approx(math.sqrt(0.1))
    st.anneal(10, 10)
    assert float(st.tau) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="gates.mode"):
        GateConfig(mode="bernoulli")
    assert GATE_MODES == ("hard_concrete", "sigmoid", "ste")
    with pytest.raises(ValueError, match="stretch"):
        GateConfig(stretch=(0.1, 1.1))
    with pytest.raises(ValueError, match="group_size"):
        GateConfig(group_size={"ffn": 0})


def test_override_forces_unit_masks():
    st = make_store()
    st.eval()
    forced = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1.0])
    with st.override({"a": forced}):
        assert torch.equal(st.unit_mask("a"), forced)
    assert not torch.equal(st.unit_mask("a"), forced)


def test_logits_as_sets_and_restores_the_logits():
    st = make_store()
    before = torch.linspace(-2, 2, len(st))
    with torch.no_grad():
        st.logits.copy_(before)
    other = torch.arange(len(st), dtype=torch.float32) - 4.5
    with st.logits_as(other):
        assert torch.equal(st.logits.detach(), other)
        assert st.open_units().tolist() == [0.0, 4.0, 1.0]
        assert st.logits.grad_fn is None and st.logits.requires_grad  # still the leaf parameter
    assert torch.equal(st.logits.detach(), before)
    # restored after an exception, which still propagates
    with pytest.raises(RuntimeError, match="boom"), st.logits_as(torch.zeros(len(st))):
        assert not st.logits.detach().any()
        raise RuntimeError("boom")
    assert torch.equal(st.logits.detach(), before)
    # the store's own logits as the argument: writes inside the block are undone on exit
    with st.logits_as(st.logits), torch.no_grad():
        st.logits.fill_(7.0)
    assert torch.equal(st.logits.detach(), before)


def test_empty_store_has_zero_penalties():
    st = GateStore(GateConfig())
    w = PenaltyWeights(l0=1.0, floor=1.0, bimodal=1.0)
    assert float(combined_penalty(st, w)) == 0.0
    assert st.expected_units().shape == (0,)
    project_gates_into_constraints(st)


def test_expand_to_units_handles_partial_last_group():
    st = make_store()
    seg = st.segment("a")
    assert expand_to_units(torch.tensor([1.0, 0.0, 1.0, 0.5]), seg).tolist() == [
        1,
        1,
        1,
        0,
        0,
        0,
        1,
        1,
        1,
        0.5,
    ]
