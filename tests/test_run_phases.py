"""Each phase of ``hawada optimize`` called on its own (hawada.run), on a tiny digits recipe."""

import json
import os

import pytest
import torch

from hawada.config import recipe_from_dict
from hawada.core.distributed import SINGLE
from hawada.core.export import store_of
from hawada.run.context import build_context
from hawada.run.finetune_phase import finetune_slim
from hawada.run.folder import RunPaths, prepare_folder
from hawada.run.gates_phase import train_gates
from hawada.run.report import build_report, write_outputs
from hawada.run.search_phase import search_and_export
from hawada.run.setup import TargetError, calibrated_proxy, load_setup, measure_setup, minimal_keep_logits
from tests.helpers import tiny_digits_recipe

TINY = tiny_digits_recipe(
    name="phases",
    train={"steps": 4, "probe_every": 2, "checkpoint_every": 2},
    target={"ratio": 0.7, "batch_size": 4},
    proxy={"mode": "analytic", "calib_points": 3},
    search={"multiples": [1, 8], "modes": ["floor", "ceil"]},
    finetune={"steps": 3, "eval_every": 2, "bn_recalib_batches": 1},
    measure={"max_repeats": 4},
)


def context(tmp_path, **sections):
    recipe = recipe_from_dict(
        {**TINY, **sections, "output": {**TINY["output"], "dir": str(tmp_path / "run")}}
    )
    paths = RunPaths.of(recipe.output.dir)
    prepare_folder(recipe, paths, resume=False)
    logs: list[str] = []
    return build_context(recipe, paths, SINGLE, logs.append), logs


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    """Every phase in order, each result kept for the tests below."""
    ctx, logs = context(tmp_path_factory.mktemp("phases"))
    setup = measure_setup(ctx)
    proxy, calib = calibrated_proxy(ctx, setup)
    calibrated_ms = float(proxy(calib[0][0]))  # probes refit this proxy during gate training
    gates = train_gates(ctx, setup, proxy, calib, resume=False)
    chosen = search_and_export(ctx, gates.student, setup)
    slim, ft_hist = finetune_slim(ctx, chosen.slim)
    return dict(
        ctx=ctx,
        logs=logs,
        setup=setup,
        calibrated_ms=calibrated_ms,
        gates=gates,
        chosen=chosen,
        slim=slim,
        ft=ft_hist,
    )


def test_context_gates_a_copy_of_the_teacher(tmp_path):
    ctx, logs = context(tmp_path)
    store = store_of(ctx.student)
    assert store.num_segments > 0 and not hasattr(ctx.teacher, "hawada_gates")
    assert logs == [f"gates: {len(store)} in {store.num_segments} segments"]


def test_setup_sets_the_target_from_keep_all_and_stores_what_a_resume_reuses(phases):
    ctx, setup = phases["ctx"], phases["setup"]
    assert setup.target_ms == pytest.approx(0.7 * setup.base_ms)
    assert setup.min_ms > 0 and len(setup.calib_ms) == 3
    stored, teacher = load_setup(ctx.paths)
    assert stored.state() == setup.state()
    # the run built its teacher (model.path null): a resume must reuse it, not build another
    assert teacher is not None and torch.equal(teacher["fc.weight"], ctx.teacher.fc.weight.detach().cpu())
    # the proxy rebuilt from the stored setup predicts what the measured one did
    again, calib = calibrated_proxy(ctx, stored)
    assert float(again(calib[0][0])) == pytest.approx(phases["calibrated_ms"], rel=1e-6)


def test_minimal_keep_logits_open_exactly_min_keep_gates():
    from hawada.core.gates import GateConfig, GateStore

    store = GateStore(GateConfig(min_keep={"ffn": 2}))
    store.register("a", "ffn", 5)
    store.register("b", "stage", 3)  # a residual stream keeps at least one
    lg = minimal_keep_logits(store)
    assert (lg > 0).tolist() == [True, True, False, False, False, True, False, False]


def test_a_target_no_keep_set_reaches_is_refused(tmp_path):
    ctx, _ = context(tmp_path, target={"latency_ms": 1e-6, "batch_size": 4})
    with pytest.raises(TargetError, match="below the fastest allowed keep set"):
        measure_setup(ctx)


def test_gate_phase_trains_every_step_and_checkpoints(phases):
    gates, ctx = phases["gates"], phases["ctx"]
    land = gates.landing  # the eval keep set exported and timed next to keep-all
    assert land["target_ms"] == pytest.approx(0.7 * land["base_ms"])
    assert land["error"] == pytest.approx((land["measured_ms"] - land["target_ms"]) / land["target_ms"])
    assert land["units"] == int(store_of(gates.student).open_units().sum()) <= land["units_total"]
    assert [r["step"] for r in gates.history] == [1, 2, 3, 4]
    assert "real_ms" in gates.history[1] and "real_ms" in gates.history[3]  # probes every 2 steps
    assert not gates.student.training
    assert os.path.isfile(os.path.join(ctx.paths.checkpoints, "latest.json"))
    with open(os.path.join(ctx.paths.partial, "metrics.jsonl")) as f:
        assert [json.loads(x)["step"] for x in f] == [1, 2, 3, 4]


def test_search_phase_measures_the_grid_and_exports_the_chosen_keep_set(phases):
    chosen = phases["chosen"]
    trials = chosen.search.trials
    assert [(t["multiple"], t["mode"]) for t in trials] == [
        (1, "floor"),
        (1, "ceil"),
        (8, "floor"),
        (8, "ceil"),
    ]
    assert chosen.target_ms == chosen.search.best["limit_ms"] == pytest.approx(0.7 * chosen.base_ms)
    assert not hasattr(chosen.slim, "hawada_gates")
    assert 0.0 <= chosen.units_moved_frac <= 1.0
    assert sum(p.numel() for p in chosen.slim.parameters()) == chosen.search.best["params"]


def test_finetune_and_report_phases_publish_the_run(phases):
    ctx, ft = phases["ctx"], phases["ft"]
    assert [r["step"] for r in ft if "kd" in r] == [1, 2, 3]
    report = build_report(ctx, phases["setup"], phases["gates"], phases["chosen"], phases["slim"], ft, 0.0)
    assert report["latency"]["train_target_ms"] == phases["setup"].target_ms
    assert report["params"]["slim"] == sum(p.numel() for p in phases["slim"].parameters())
    lat = report["latency"]
    assert lat["speedup"] == pytest.approx(lat["base"]["median_ms"] / lat["slim"]["median_ms"])
    assert lat["speedup_ci"][0] <= lat["speedup"] <= lat["speedup_ci"][1]
    assert report["train"]["lambda_end"] <= report["train"]["lambda_max"] == 100.0
    assert report["train"]["landing"] == phases["gates"].landing
    assert report["search"]["units_moved_frac"] == phases["chosen"].units_moved_frac
    assert set(report["proxy"]) >= {"keepall_error", "calib_mape"}
    out = write_outputs(ctx, report, phases["gates"], phases["slim"], ft)
    assert out == ctx.paths.out and not os.path.exists(ctx.paths.partial)
    assert {"metrics.jsonl", "report.json", "slim"} <= set(os.listdir(out)) and "state" not in os.listdir(out)
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["agreement"] == report["agreement"]
