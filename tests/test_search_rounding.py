"""The search's rounding (half up, per kind, never above a segment), its finalists re-timed
interleaved with keep-all and held to the target with their interval, and export.uniform's
model being the one timed."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import hawada
from hawada.config import load_recipe, recipe_from_dict
from hawada.core.distributed import SINGLE
from hawada.core.export import ExportPolicy, Rounding, export, keep_counts, param_count, store_of
from hawada.core.profiler import ratio_ci
from hawada.core.search_export import SearchConfig, grid_search_latency, search_export
from hawada.errors import InputError
from tests.helpers import latency_result, tiny_digits_recipe
from tests.test_search_finetune import ParamMeter, gated_random

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- rounding
def test_nearest_rounds_half_up():
    r = Rounding(8, "nearest")
    assert r.apply(12, 64) == 16  # half: up (round() would give 16 here too)
    assert r.apply(20, 64) == 24  # half: up, where round() rounds half to even (16)
    assert r.apply(28, 64) == 32 and r.apply(19, 64) == 16 and r.apply(21, 64) == 24
    assert r.apply(4, 64) == 8  # half of the first multiple: up, never to zero
    assert r.apply(3, 64) == 8  # an open segment never rounds down to zero
    assert r.apply(0, 64) == 0  # a closed one stays closed


@pytest.mark.parametrize("mode", ["nearest", "floor", "ceil"])
def test_exact_multiples_and_full_sizes_are_unchanged(mode):
    for k in (8, 16, 24, 64):
        assert Rounding(8, mode).apply(k, 64) == k
    assert Rounding(8, mode).apply(60, 60) == 60  # the full size, although not a multiple


def test_floor_and_ceil():
    assert Rounding(8, "floor").apply(15, 64) == 8 and Rounding(8, "ceil").apply(9, 64) == 16
    assert Rounding(8, "floor").apply(5, 64) == 8  # never to zero


def test_rounding_never_goes_above_a_segment_and_counts_its_full_size_as_allowed():
    # 96 units, multiple 64: the allowed counts are 64 and 96 (the next multiple, 128, is past it)
    assert Rounding(64, "ceil").apply(70, 96) == 96
    assert Rounding(64, "nearest").apply(80, 96) == 96  # 16 from 64 and from 96: half up
    assert Rounding(64, "nearest").apply(79, 96) == 64
    assert Rounding(64, "nearest").apply(90, 96) == 96  # round(90 / 64) * 64 would be 64
    assert Rounding(64, "floor").apply(90, 96) == 64
    for units in (3, 4, 8, 60, 96, 100):
        for m in (1, 2, 8, 64, 128):
            for mode in ("nearest", "floor", "ceil"):
                for o in range(units + 1):
                    k = Rounding(m, mode).apply(o, units)
                    assert 0 <= k <= units
                    assert k % m == 0 or k == units or m >= units  # a multiple or the full size
                    assert (k == 0) == (o == 0)


def test_a_multiple_no_smaller_than_the_segment_leaves_it_unrounded():
    # LLaMA-style: 4 query slots per KV group, 8 KV groups; a multiple of 64 is meant for the FFN
    for mode in ("nearest", "floor", "ceil"):
        assert [Rounding(64, mode).apply(o, 4) for o in range(5)] == [0, 1, 2, 3, 4]
        assert Rounding(128, mode).apply(5, 8) == 5
        assert Rounding(8, mode).apply(3, 8) == 3
    assert Rounding(64, "ceil", min_keep_ratio=0.5).apply(1, 4) == 2  # min_keep_ratio still holds


def test_only_the_listed_kinds_are_rounded():
    g = gated_random()
    st = hawada.gates(g)
    free = keep_counts(st)
    res = grid_search_latency(
        g, 1e9, ParamMeter(), multiples=(48,), modes=("ceil",), kinds=["block"], finalists=1
    )
    counts = keep_counts(st, res.policy)
    blocks = [s for s in st.segments if s.kind == "block"]
    stages = [s for s in st.segments if s.kind == "stage"]
    assert blocks and stages
    assert all(counts[s.name] == free[s.name] for s in stages)  # not listed: as the gates chose
    assert all(counts[s.name] % 48 == 0 or counts[s.name] == s.units for s in blocks)
    assert any(counts[s.name] != free[s.name] for s in blocks)
    every = grid_search_latency(g, 1e9, ParamMeter(), multiples=(48,), modes=("ceil",), finalists=1)
    assert any(keep_counts(st, every.policy)[s.name] != free[s.name] for s in stages)
    with pytest.raises(InputError, match="not gate kinds of this model"):
        grid_search_latency(g, 1e9, ParamMeter(), multiples=(8,), modes=("ceil",), kinds=["ffn"])


@pytest.mark.parametrize("device", ["H100", "H200"])
def test_llama_recipes_round_only_the_ffn(device):
    r = load_recipe(os.path.join(ROOT, "recipes", device, "llama_3_2_1b.yaml"))
    assert r.search.kinds == ["ffn"] and max(r.search.multiples) >= 64


# ---------------------------------------------------------------------- finalists
class SpreadMeter:
    """Deterministic timings with a spread: each call gives ``1 ms per 1000 parameters`` times
    ``1 + spread x (-1, -1/2, 0, 1/2, 1)`` (median: the parameter count). Keep-all and an export
    have the same pattern, so each single timing's ratio of medians is the ratio of parameters."""

    def __init__(self, spread: float):
        self.spread, self.calls = spread, 0

    def __call__(self, model):
        self.calls += 1
        base = param_count(model) / 1000.0
        return latency_result([base * (1 + self.spread * f) for f in (-1, -0.5, 0, 0.5, 1)])


def grid_ratios(g, full):
    """Parameter ratio (export / keep-all) of every trial of the grid below, and its gate mass."""
    res = grid_search_latency(
        g, 1e9, ParamMeter(), multiples=(1, 8, 32), modes=("floor", "ceil"), finalists=1
    )
    return [(t["params"] / param_count(full), t["gate_mass"]) for t in res.trials]


def test_a_trial_within_target_once_but_not_with_its_interval_is_rejected():
    g = gated_random()
    full = hawada.export_keepall(g)
    ratios = grid_ratios(g, full)
    # the target sits 1 % above the most massive trial of those below 90 % of keep-all: that
    # trial is within target on its single timing, with less margin than the timing's spread
    near = max((r for r in ratios if r[0] < 0.9), key=lambda r: r[1])[0]
    target = 1.01 * near
    meter = SpreadMeter(0.1)
    cfg = SearchConfig(multiples=[1, 8, 32], modes=["floor", "ceil"], finalists=2, confirm_rounds=3)
    res = search_export(g, 1.0, meter, cfg, reference=full, ratio=target)
    fin = res.finalists
    first = fin[0]
    trial = res.trials[first["trial"]]
    assert trial["within_target"] and trial["median_ms"] <= trial["limit_ms"]  # single timing: within
    assert first["ratio"] <= target < first["ratio_ci"][1] and not first["within_target"]  # interval: not
    # the chosen one is the best finalist that passed, with its whole interval within target
    passed = [f for f in fin if f["within_target"]]
    assert passed and res.best == passed[0] and res.met_target and res.fallback is None
    assert res.best["ratio_ci"][1] <= target and res.best["params"] < first["params"]
    assert param_count(export(g, res.policy)) == res.best["params"]
    for f in fin:  # every finalist timed interleaved with keep-all over 3 rounds of 5 samples
        assert f["n"] == 15 and f["reference_ms"] == pytest.approx(param_count(full) / 1000.0)
        assert f["ratio"] == pytest.approx(f["params"] / param_count(full))
        assert f["ratio_ci"][0] <= f["ratio"] <= f["ratio_ci"][1] and f["target_ratio"] == target
        assert f["limit_ms"] == pytest.approx(target * f["reference_ms"])
    # finalists: the best by gate mass first, then the fastest within target on its single timing
    within = [t for t in res.trials if t["within_target"]]
    assert res.trials[fin[-1]["trial"]]["median_ms"] == min(t["median_ms"] for t in within)
    assert meter.calls == 2 * len(res.trials) + 3 * (1 + len(fin))


def test_no_finalist_passing_is_a_fallback_said_so():
    g = gated_random()
    full = hawada.export_keepall(g)
    smallest = min(r for r, _ in grid_ratios(g, full))
    cfg = SearchConfig(multiples=[1, 8, 32], modes=["floor", "ceil"], finalists=3)
    res = search_export(g, 1.0, SpreadMeter(0.3), cfg, reference=full, ratio=1.001 * smallest)
    assert any(t["within_target"] for t in res.trials)
    assert res.finalists and not any(f["within_target"] for f in res.finalists)
    assert not res.met_target and "none of the" in res.fallback and "95%" in res.fallback
    assert res.best == min(res.finalists, key=lambda f: f["ratio_ci"][1])
    # nothing within target even once: the fastest is re-timed, and the fallback says why
    none = search_export(g, 1.0, SpreadMeter(0.3), cfg, reference=full, ratio=0.5 * smallest)
    assert len(none.finalists) == 1 and not none.met_target
    assert none.fallback.startswith("no trial was within target")


def test_an_absolute_target_is_held_with_the_interval_of_the_median():
    g = gated_random()
    full_ms = param_count(hawada.export_keepall(g)) / 1000.0
    cfg = SearchConfig(multiples=[1, 8, 32], modes=["floor", "ceil"], finalists=2)
    res = search_export(g, 0.9 * full_ms, SpreadMeter(0.1), cfg)
    for f in res.finalists:
        assert f["reference_ms"] is None and f["target_ratio"] == 1.0
        assert f["ratio"] == pytest.approx(f["median_ms"] / (0.9 * full_ms))
        assert f["within_target"] == (f["ratio_ci"][1] <= 1.0)
    assert res.met_target and res.best["limit_ms"] == pytest.approx(0.9 * full_ms)
    # ratio_ci over a fixed number: only the numerator's samples are resampled
    assert ratio_ci(latency_result([4.0, 4.0]), 2.0) == pytest.approx((2.0, 2.0))
    lo, hi = ratio_ci(latency_result([3.0, 4.0, 5.0, 4.0, 4.0]), 2.0)
    assert 1.5 <= lo < 2.0 < hi <= 2.5


# ---------------------------------------------------------------------- export.uniform
def test_export_uniform_times_and_describes_the_uniform_model():
    transformers = pytest.importorskip("transformers")
    from hawada.adapters.hf_decoder import HFDecoderAdapter, layer_widths
    from hawada.core.gates import GateConfig
    from hawada.run.search_phase import search_and_export
    from hawada.run.setup import Setup

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    student = copy.deepcopy(teacher)
    ad = HFDecoderAdapter()
    ad.attach(student, GateConfig(group_size={"ffn": 16}))
    st = store_of(student)
    # layers of different widths whose mean is not a whole count (query slots 1, 2, 2 of 3 per
    # KV group; FFN groups 2, 8, 3 of 8), so that the uniform layout is another model; every layer
    # stays
    opened = {"heads": [1, 2, 2], "kv": [2, 2, 2], "ffn": [2, 8, 3], "layer": [1, 1, 1]}
    with torch.no_grad():
        for s in st.segments:
            layer, part = s.name.split(".")
            k = opened[part][int(layer.removeprefix("layer"))]
            st.logits[s.start : s.stop] = torch.tensor([2.0] * k + [-2.0] * (s.count - k))
    student.eval()
    recipe = recipe_from_dict(
        tiny_digits_recipe(
            target={"ratio": 0.95},
            search={"multiples": [1, 32], "modes": ["floor", "ceil"], "finalists": 2},
            export={"uniform": True},
        )
    )
    logs: list[str] = []
    ctx = type("Ctx", (), {})()  # the fields search_and_export reads, on a real tiny LLaMA
    ctx.recipe, ctx.teacher, ctx.adapter, ctx.env, ctx.log = recipe, teacher, ad, SINGLE, logs.append
    ctx.meter, ctx.device = ParamMeter(), torch.device("cpu")
    # the batch each trial's quality is scored on (report.png's latency-quality plane)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ctx.job = type("Job", (), {"train_loader": [batch]})()
    setup = Setup(1.0, 0.1, 0.95, 0.0, 0.0, [], [], False, {})
    chosen = search_and_export(ctx, student, setup)
    best = chosen.search.best
    widths = layer_widths(chosen.slim)
    assert all(w == widths[0] for w in widths)  # the shipped model is uniform
    # the chosen entry describes the shipped model: its parameters and its timing
    assert best["uniform"] and best["params"] == param_count(chosen.slim)
    assert best["median_ms"] == pytest.approx(param_count(chosen.slim) / 1000.0)
    # ... which is not the per-layer export its trial timed
    trial = chosen.search.trials[best["trial"]]
    r = Rounding(trial["multiple"], trial["mode"])
    searched = export(student, ExportPolicy(per_kind={k: r for k in ("head", "kv_group", "ffn")}))
    assert trial["params"] == param_count(searched) != best["params"]
    uni = ad.uniform_policy(student, ExportPolicy(per_kind={k: r for k in ("head", "kv_group", "ffn")}))
    assert keep_counts(st, uni) == keep_counts(st, chosen.search.policy)
    assert chosen.target_ms == best["limit_ms"] == pytest.approx(0.95 * chosen.base_ms)
    assert any("(uniform layout)" in line for line in logs)
