"""``measure.runtime``: a run measures every latency in the runtime users deploy, ships that
runtime's artifact in slim/, scores agreement on the deployed model, and fine-tunes
quantization-aware for the int8 runtimes (docs/DESIGN.md, "Runtimes").

Real tiny models throughout (a BERT encoder, a ViT classifier); the runtimes are the real
libraries. "Not installed" is made the way Python sees it: the module's ``sys.modules`` entry set
to None makes its import fail.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

import hawada.runtimes.meter as meter_module  # noqa: E402
from hawada.adapters.base import adapter_for  # noqa: E402
from hawada.cli import main  # noqa: E402
from hawada.config import recipe_from_dict  # noqa: E402
from hawada.core.distill import KDConfig  # noqa: E402
from hawada.core.finetune import FinetuneConfig, finetune_student  # noqa: E402
from hawada.core.profiler import MeasureConfig, measure_pooled  # noqa: E402
from hawada.core.qat import SCHEMES, quantization_aware  # noqa: E402
from hawada.errors import InputError  # noqa: E402
from hawada.jobs import Job  # noqa: E402
from hawada.jobs.vision import build_vision_job  # noqa: E402
from hawada.run import optimize  # noqa: E402
from hawada.run.context import make_meter  # noqa: E402
from hawada.runtimes import RUNTIMES, RuntimeMissingError, load_artifact  # noqa: E402
from hawada.runtimes.base import conform  # noqa: E402
from hawada.runtimes.meter import DeployedModel, RuntimeMeter  # noqa: E402
from hawada.runtimes.torch_runtimes import quantize_int8  # noqa: E402
from hawada.slim_io import load_slim  # noqa: E402
from tests.test_minimal_recipes import SIZES, TINY_VIT_SIZES, tiny_vit_required, with_sizes  # noqa: E402
from tests.test_runtimes import INT8_MIN_COSINE, eager_output, min_row_cosine, tiny_bert  # noqa: E402

FAST = SIZES["measure"]  # a few short timings


def in_runtime(runtime: str) -> dict:
    """The recipe sections of a short run measured in ``runtime`` (``with_sizes`` replaces a
    section it is given, so the short timings of :data:`SIZES` are kept here)."""
    return {
        "measure": {**SIZES["measure"], "runtime": runtime},
        "proxy": {**SIZES["proxy"], "mode": "analytic"},
    }


def bert_inputs(batch: int = 2) -> dict:
    return {
        "input_ids": torch.randint(1, 61, (batch, 8), generator=torch.Generator().manual_seed(0)),
        "attention_mask": torch.ones(batch, 8, dtype=torch.long),
    }


def run_meter(runtime: str, inputs) -> object:
    """The run's meter (``run.context.make_meter``) for a recipe with ``measure.runtime``."""
    recipe = recipe_from_dict(
        with_sizes(
            {"model": {"family": "hf_encoder"}, "data": {"kind": "stdlib_docstrings"}},
            "unused",
            **in_runtime(runtime),
        )
    )
    job = Job(adapter_for(tiny_bert()), None, None, None, inputs, None, "", None, {})
    return make_meter(recipe, job)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_run_meter_times_each_runtime(runtime) -> None:
    torch.set_num_threads(1)
    a, b = tiny_bert(), tiny_bert()
    with torch.no_grad():
        b.encoder.layer[0].intermediate.dense.weight.mul_(2.0)
    meter = run_meter(runtime, bert_inputs())
    assert isinstance(meter, RuntimeMeter) == (runtime != "eager")  # eager: today's meter, unchanged
    try:
        r = meter(a)
        assert r.runtime == runtime and r.median_ms > 0 and 2 <= r.n <= 3
        assert r.shapes == [[2, 8], [2, 8]]
        if runtime.startswith("onnxruntime"):
            assert r.timer == f"child:{runtime}"  # timed in a worker process, never in this one
        # interleaved in the runtime: each model's samples pooled over the rounds
        ra, rb = measure_pooled([a, b], meter, rounds=2)
        assert ra.runtime == rb.runtime == runtime and ra.n >= 4 and rb.n >= 4
        if runtime != "eager":
            assert meter.built == 2  # each model deployed once for all its timings
            with torch.no_grad():  # changed weights: deployed again
                a.pooler.dense.bias.add_(1.0)
            meter(a)
            assert meter.built == 3
    finally:
        if runtime != "eager":
            meter.close()


def test_ort_meter_keeps_at_most_pool_workers(monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.setattr(meter_module, "POOL", 2)  # two worker starts instead of four
    meter = RuntimeMeter("onnxruntime", bert_inputs(), "cpu", MeasureConfig(**FAST, runtime="onnxruntime"), 1)
    models = [tiny_bert() for _ in range(4)]
    try:
        for m in models:
            assert meter(m).runtime == "onnxruntime"
        pool = meter._pool
        assert len(pool.busy) + len(pool.idle) == 2  # later models are loaded by the same processes
        assert all(w.proc.poll() is None for w in pool.busy)
        assert meter(models[-1]).n >= 2 and meter.built == 4  # the latest is still loaded
        assert meter(models[0]).n >= 2 and meter.built == 5  # the first was dropped: deployed again
    finally:
        meter.close()
    assert not pool.busy and not pool.idle


def test_unknown_runtime_is_one_line_listing_the_choices(tmp_path, capsys) -> None:
    assert MeasureConfig().runtime == "eager"
    with pytest.raises(InputError, match="measure.runtime: 'tensorrt' is not one of eager, int8_dynamic"):
        MeasureConfig(runtime="tensorrt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {family: hf_encoder}\ndata: {kind: stdlib_docstrings}\nmeasure: {runtime: tensorrt}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    assert main(["optimize", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onnxruntime_int8" in err
    assert not (tmp_path / "out").exists()


def test_missing_runtime_package_fails_before_any_work(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    out = tmp_path / "run"
    recipe = recipe_from_dict(
        with_sizes(
            tiny_vit_required(tmp_path),
            out,
            **TINY_VIT_SIZES,
            **in_runtime("onnxruntime_int8"),
        )
    )
    with pytest.raises(RuntimeMissingError, match=r"pip install 'hawada\[onnx\]'") as e:
        optimize(recipe, log=lambda s: None)
    assert "\n" not in str(e.value)
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_settings_that_time_eager_only_are_refused(tmp_path) -> None:
    base = tiny_vit_required(tmp_path)
    lut = recipe_from_dict(
        with_sizes(base, tmp_path / "a", measure={**SIZES["measure"], "runtime": "int8_dynamic"})
    )
    with pytest.raises(InputError, match="proxy.mode: lut"):
        optimize(lut, log=lambda s: None)
    gpu = recipe_from_dict(with_sizes(base, tmp_path / "b", device="cuda", **in_runtime("int8_dynamic")))
    with pytest.raises(InputError, match="CPU only"):
        optimize(gpu, log=lambda s: None)


@pytest.mark.parametrize("runtime", ["int8_dynamic", "onnxruntime_int8"])
def test_optimize_in_an_int8_runtime(tmp_path, runtime, capsys) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "run"
    recipe = recipe_from_dict(
        with_sizes(
            tiny_vit_required(tmp_path),
            out,
            **TINY_VIT_SIZES,
            **in_runtime(runtime),
        )
    )
    rep = optimize(recipe, log=lambda s: None)
    saved = json.loads((out / "report.json").read_text())
    lat = saved["latency"]
    # every latency of the run was measured in the runtime, and the report says which
    assert lat["runtime"]["name"] == runtime and "torch" in lat["runtime"]["versions"]
    if runtime == "onnxruntime_int8":
        assert lat["runtime"]["versions"]["onnxruntime"] != "missing"
    assert lat["base"]["runtime"] == lat["slim"]["runtime"] == runtime
    assert saved["train"]["finetune_qat"] is True  # auto: on for an int8 runtime
    # the slim folder ships the runtime's artifact; it loads through the runtime and matches the
    # slim model within the runtime's int8 bound
    slim_dir = str(out / "slim")
    manifest = json.loads((out / "slim" / "runtimes.json").read_text())
    assert list(manifest) == [runtime]
    slim = load_slim(slim_dir)
    x = adapter_for(slim).example_inputs(slim, 3)  # {"pixel_values": [3, 3, 16, 16]}
    deployed = load_artifact(slim_dir, runtime)
    x = conform(x, deployed.names)  # the artifact's one tensor input
    assert min_row_cosine(deployed(x), eager_output(slim, x)) > INT8_MIN_COSINE
    # agreement was measured on the deployed model: the same numbers again from it, not from fp32
    job = build_vision_job(recipe, torch.device("cpu"))
    on_deployed = job.evaluate(job.teacher, DeployedModel(slim, runtime, job.latency_inputs), "test")
    on_fp32 = job.evaluate(job.teacher, slim, "test")
    assert saved["agreement_measured_in"] == runtime
    assert on_deployed["kl"] != on_fp32["kl"]
    assert rep["agreement"]["kl"] == pytest.approx(on_deployed["kl"], rel=1e-5, abs=1e-7)
    for k in ("top1_agreement", "student_accuracy", "examples"):
        assert rep["agreement"][k] == on_deployed[k], k
    # hawada eval times the artifact in its runtime and says so
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"latency now ({runtime})" in text and "runtime" in text
    assert main(["eval", str(out), "--json"]) == 0
    now = json.loads(capsys.readouterr().out)
    assert now["runtime"] == runtime and now["timer"] == f"child:{runtime}"


def test_eval_of_a_folder_without_that_artifact_is_one_line(tmp_path, capsys) -> None:
    from hawada.slim_io import save_slim

    save_slim(tiny_bert(), str(tmp_path / "m"))
    assert main(["eval", str(tmp_path / "m"), "--runtime", "onnxruntime", "--json"]) == 2
    assert "holds no onnxruntime artifact" in capsys.readouterr().err


# -- quantization-aware fine-tuning ----------------------------------------------------------


def test_fake_quant_matches_torch_dynamic_int8() -> None:
    """The fake-quantized Linear computes what torch's dynamic int8 Linear computes (up to a few
    weights rounded the other way at float precision), far closer than fp32 does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(8, 64) * 3 + 0.5
    with torch.no_grad():
        fp32, int8 = model(x), quantize_int8(model)(x)
        with quantization_aware(model, SCHEMES["int8_dynamic"]) as n:
            fake = model(x)
    assert n == 2
    assert (fake - int8).abs().max() < 0.25 * (fp32 - int8).abs().max()
    with torch.no_grad():  # restored on exit: fp32 again, same class, same state dict keys
        assert torch.equal(model(x), fp32)
    assert "forward" not in vars(model[0])


def int8_error(student: torch.nn.Module, teacher: torch.nn.Module, batches: list[dict]) -> float:
    """Mean squared error of the int8 student's output against the teacher's, over ``batches``."""
    q = quantize_int8(student)
    ad = adapter_for(teacher)
    with torch.no_grad():
        return sum(F.mse_loss(ad.output(q, b), ad.output(teacher, b)).item() for b in batches) / len(batches)


def finetuned(start: torch.nn.Module, teacher, batches, qat: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = FinetuneConfig(
        steps=100,
        lr=1e-4,
        warmup_steps=0,
        bn_recalib_batches=0,
        qat=qat,
        runtime="int8_dynamic",
        progress=False,
    )
    student, _ = finetune_student(
        copy.deepcopy(start), teacher, adapter_for(teacher), batches, cfg, KDConfig()
    )
    return student


# QAT's int8 error over plain fine-tuning's, from the same start with the same steps and seed,
# measured over seeds 0-4: 0.73, 0.83, 0.73, 0.58, 0.74. Asserted below 0.9.
QAT_MARGIN = 0.9


def test_qat_lowers_the_int8_error() -> None:
    torch.set_num_threads(1)
    seed = 0
    teacher = tiny_bert()
    with torch.no_grad():  # a random-init BERT's attention and FFN add little to its residual
        for m in teacher.modules():  # stream; with larger weights int8 rounding is a visible error
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10.0)
    torch.manual_seed(100 + seed)
    start = copy.deepcopy(teacher)
    with torch.no_grad():  # a student that already matches the teacher in fp32, nearly
        for p in start.parameters():
            p.add_(0.002 * p.std() * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    batches = [
        {
            "input_ids": torch.randint(1, 61, (8, 12), generator=g),
            "attention_mask": torch.ones(8, 12, dtype=torch.long),
        }
        for _ in range(12)
    ]
    batches, held = batches[:8], batches[8:]  # trained on, scored on
    plain = int8_error(finetuned(start, teacher, batches, "off", seed), teacher, held)
    qat = int8_error(finetuned(start, teacher, batches, "on", seed), teacher, held)
    assert qat < QAT_MARGIN * plain, (qat, plain)
