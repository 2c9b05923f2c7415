"""report.png: the search's trials on the latency-quality plane and the per-layer layout, from a
real (tiny) run; each trial's quality is the output cosine of the very export that was timed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch

from hawada.config import recipe_from_dict
from hawada.core.distributed import SINGLE
from hawada.run.context import build_context
from hawada.run.finetune_phase import finetune_slim
from hawada.run.folder import RunPaths, prepare_folder
from hawada.run.gates_phase import train_gates
from hawada.run.report import build_report, plot_data, plot_run, write_outputs
from hawada.run.search_phase import QUALITY_KEY, QUALITY_LABEL, TrialScorer, output_cosine, search_and_export
from hawada.run.setup import calibrated_proxy, measure_setup
from tests.helpers import tiny_digits_recipe

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Every phase of a tiny digits run, with a search of 2 x 2 roundings and 2 fill/trim probes."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("plot") / "run"
    recipe = recipe_from_dict(
        tiny_digits_recipe(
            name="plot",
            gates={"init_logit": 0.3},
            penalties={"l0": 2.0},
            train={"steps": 4, "probe_every": 0, "lr_gates": 0.3},
            target={"ratio": 0.8, "batch_size": 4},
            proxy={"mode": "analytic", "calib_points": 2},
            search={"multiples": [1, 8], "modes": ["floor", "ceil"], "fill_probes": 2},
            finetune={"steps": 2, "eval_every": 1, "bn_recalib_batches": 0},
            measure={"max_repeats": 3},
            output={"dir": str(out), "plot": True},
        )
    )
    paths = RunPaths.of(recipe.output.dir)
    prepare_folder(recipe, paths, resume=False)
    ctx = build_context(recipe, paths, SINGLE, lambda s: None)
    setup = measure_setup(ctx)
    proxy, calib = calibrated_proxy(ctx, setup)
    gates = train_gates(ctx, setup, proxy, calib, resume=False)
    chosen = search_and_export(ctx, gates.student, setup)
    # the chosen export as the search timed it (fine-tuning changes the weights afterwards)
    chosen_cos = TrialScorer(ctx, None).score(chosen.slim)
    slim, hist = finetune_slim(ctx, chosen.slim)
    report = build_report(ctx, setup, gates, chosen, slim, hist, time.perf_counter())
    folder = write_outputs(ctx, report, gates, slim, hist)
    return dict(report=report, folder=folder, history=gates.history, chosen_cos=chosen_cos, ctx=ctx)


def test_every_trial_carries_the_output_cosine_of_its_export(run) -> None:
    search = run["report"]["search"]
    assert len(search["trials"]) >= 4  # the 2 x 2 grid, then the probes
    for t in search["trials"]:
        assert -1.0 <= t[QUALITY_KEY] <= 1.0 + 1e-9
    # the chosen trial's number is the cosine of the model the search exported and timed
    assert search["chosen"][QUALITY_KEY] == pytest.approx(run["chosen_cos"], abs=1e-9)
    # the teacher scores exactly 1 against itself
    assert TrialScorer(run["ctx"], None).score(run["ctx"].teacher) == pytest.approx(1.0, abs=1e-12)


def test_output_cosine_is_masked_and_row_wise() -> None:
    ref = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, 2, 2]
    out = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    assert output_cosine(out, ref) == pytest.approx(0.5)
    assert output_cosine(out, ref, torch.tensor([[1, 0]])) == pytest.approx(1.0)
    # a token mask beside a pooled [B, D] output does not apply to it
    assert output_cosine(out[0], ref[0], torch.tensor([[1, 0, 1]])) == pytest.approx(0.5)


def test_report_png_is_written_from_keepall_every_trial_and_the_chosen_point(run, tmp_path) -> None:
    folder, report = run["folder"], run["report"]
    png = (Path(folder) / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    saved = json.loads((Path(folder) / "report.json").read_text())
    data = plot_run(saved, run["history"], str(tmp_path / "again.png"))
    assert data is not None and (tmp_path / "again.png").stat().st_size > 10_000
    plane = data["plane"]
    assert plane["keepall"] == {"x": 1.0, "y": 1.0}
    assert plane["y_label"] == QUALITY_LABEL
    trials = saved["search"]["trials"]
    assert len(plane["trials"]) == len(trials)
    for p, t in zip(plane["trials"], trials):
        assert p["x"] == pytest.approx(t["median_ms"] / t["reference_ms"])
        assert p["y"] == t[QUALITY_KEY]
        assert p["within_target"] == t["within_target"]
    labels = [p["label"] for p in plane["trials"]]
    assert labels[:4] == ["1/floor", "1/ceil", "8/floor", "8/ceil"]
    ch = saved["search"]["chosen"]
    assert plane["chosen"]["x"] == pytest.approx(ch["median_ms"] / ch["reference_ms"])
    assert plane["chosen"]["y"] == ch[QUALITY_KEY]
    # the chosen point is its trial's export re-timed with the other finalists: the trial's quality,
    # the re-timed latency
    assert plane["chosen"]["y"] == trials[ch["trial"]][QUALITY_KEY]
    assert plane["target"] == pytest.approx(0.8)
    # the layout: channels per residual block, base >= slim, and the slim numbers of the report
    layers = data["layers"]
    n_blocks = sum(len(stage) for stage in saved["layout"]["base"]["layers"])
    assert list(layers) == ["stem", *(f"block {i}" for i in range(n_blocks))]
    assert layers and all(b >= s >= 0 for b, s in layers.values())
    assert any(s < b for b, s in layers.values()) or report["params"]["ratio"] == 1.0
    assert not math.isnan(sum(s for _, s in layers.values()))


def test_plot_data_falls_back_to_gate_mass_for_reports_without_a_trial_quality(run) -> None:
    old = json.loads(json.dumps(run["report"]))
    for t in [*old["search"]["trials"], old["search"]["chosen"]]:
        t.pop(QUALITY_KEY)
    plane = plot_data(old)["plane"]
    assert plane["y_label"].startswith("kept gate probability mass")
    assert [p["y"] for p in plane["trials"]] == [t["gate_mass"] for t in old["search"]["trials"]]
