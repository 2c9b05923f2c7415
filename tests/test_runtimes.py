"""The runtime layer (hawada.runtimes) on real tiny models: a BERT encoder, a ResNet, and the
exported slim model of a gated BERT with a non-uniform layout (heads and FFN widths differ by
layer, one layer without heads, one without FFN).

Each runtime's artifact is saved, loaded through the runtime's own API and run at a batch size
other than the one it was traced with; fp32 runtimes match eager within 1e-4 relative error, int8
runtimes within a cosine bound (below). The child-process timer returns the samples asked for.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import BertModel

import hawada
from hawada.adapters.base import adapter_for
from hawada.core.export import relative_error
from hawada.core.gates import GateConfig
from hawada.core.profiler import ratio_ci
from hawada.errors import InputError, PathNotFoundError
from hawada.runtimes import (
    RUNTIMES,
    Artifact,
    RuntimeMissingError,
    UnknownRuntimeError,
    build,
    get_runtime,
    load_artifact,
    runtime_names,
    save_artifact,
    time_artifacts,
)
from hawada.runtimes.base import Runtime
from tests.helpers import tiny_resnet
from tests.test_hf_encoder import GROUP, bert_cfg, randomize

ort = pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")

# int8 bound: the minimum over rows of cosine(int8 output, fp32 output). Measured at batch 4
# (test_int8_bound_is_tight_enough prints it with -s): torch int8 0.99996 (ResNet, whose fc alone
# is quantized) to 1.0 (the slim BERT, rounded), ORT int8 0.99921 (ResNet) to 0.99997 (BERTs).
INT8_MIN_COSINE = 0.995
FP32_TOL = 1e-4


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    return BertModel(bert_cfg("sdpa")).eval()


def slim_bert() -> torch.nn.Module:
    """The export of a gated tiny BERT whose layers keep different widths (non-uniform layout)."""
    g = hawada.attach(tiny_bert(), GateConfig(group_size={"ffn": GROUP}))
    randomize(hawada.gates(g))
    slim = hawada.export(g)
    lay = adapter_for(slim).layout(slim)["layers"]
    assert len({(la["attn"], la["ffn"]) for la in lay}) == len(lay)  # every layer differs
    return slim


MODELS = {"bert": tiny_bert, "resnet": tiny_resnet, "slim_bert": slim_bert}


def inputs_of(model: torch.nn.Module, batch: int) -> dict | torch.Tensor:
    return adapter_for(model).example_inputs(model, batch)


def eager_output(model: torch.nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return adapter_for(model).output(model, x).float()


def min_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1).min().item()


def test_the_issue_names_are_the_registered_runtimes() -> None:
    assert set(RUNTIMES) == set(runtime_names())
    assert RUNTIMES == ("eager", "int8_dynamic", "onnxruntime", "onnxruntime_int8", "compile")


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime", "int8_dynamic", "onnxruntime_int8"])
@pytest.mark.parametrize("name", list(MODELS))
def test_artifact_saves_loads_and_matches_eager(tmp_path, name: str, runtime: str) -> None:
    model = MODELS[name]()
    folder = str(tmp_path / "art")
    path = save_artifact(model, inputs_of(model, 2), folder, runtime)
    assert os.path.isfile(path)
    deployed = load_artifact(folder, runtime)  # the folder's only artifact, named anyway
    x = inputs_of(model, 3)  # another batch size than the one traced: the batch axis is dynamic
    ref = eager_output(model, x)
    got = deployed(x)
    assert got.shape == ref.shape
    if "int8" in runtime:
        assert min_row_cosine(got, ref) > INT8_MIN_COSINE
        if name != "resnet":  # ResNet's int8 covers only its fc layer; the encoders' every Linear
            assert relative_error(got, ref) > 1e-6, "int8 output equals fp32: nothing was quantized"
    else:
        assert relative_error(got, ref) <= FP32_TOL
    # The in-memory deployment computes the same as the saved one.
    assert relative_error(build(model, inputs_of(model, 2), runtime)(x), got) <= FP32_TOL


def test_onnx_artifacts_load_in_plain_onnxruntime(tmp_path) -> None:
    """The files are ORT's own: a bare InferenceSession runs them, without hawada."""
    model = slim_bert()
    folder = str(tmp_path / "art")
    save_artifact(model, inputs_of(model, 2), folder, "onnxruntime")
    save_artifact(model, inputs_of(model, 2), folder, "onnxruntime_int8")
    x = inputs_of(model, 4)
    feed = {k: v.numpy() for k, v in x.items()}
    fp32 = ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])
    int8 = ort.InferenceSession(os.path.join(folder, "model.int8.onnx"), providers=["CPUExecutionProvider"])
    ref = eager_output(model, x)
    assert relative_error(torch.from_numpy(fp32.run(None, feed)[0]), ref) <= FP32_TOL
    assert min_row_cosine(torch.from_numpy(int8.run(None, feed)[0]), ref) > INT8_MIN_COSINE
    import onnx

    ops = {n.op_type for n in onnx.load(os.path.join(folder, "model.int8.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"}, ops
    # One folder holds both artifacts; without a name the choice is ambiguous.
    with pytest.raises(InputError, match="name the runtime"):
        load_artifact(folder)


def test_torch_int8_artifact_names_every_quantized_layer(tmp_path) -> None:
    """The int8 artifact is a JSON recipe (no pickle): it names one quantized layer per non-empty
    Linear; the loaded model quantizes exactly those, and a recipe that names others is refused."""
    model = tiny_bert()
    folder = str(tmp_path / "art")
    save_artifact(model, inputs_of(model, 2), folder, "int8_dynamic")
    spec_path = os.path.join(folder, "model.int8.json")
    with open(spec_path) as f:
        spec = json.load(f)
    linears = sum(isinstance(m, torch.nn.Linear) and m.weight.numel() > 0 for m in model.modules())
    assert len(spec["layers"]) == linears > 0
    spec["layers"] = spec["layers"][1:]
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    with pytest.raises(InputError, match="describes another int8 model"):
        load_artifact(folder, "int8_dynamic")


def test_int8_bound_is_tight_enough() -> None:
    """The int8 bound is not vacuous: a random model's output is far below it, and the measured
    int8 cosines (printed with -s) sit between."""
    for name, make in MODELS.items():
        model = make()
        x = inputs_of(model, 4)
        ref = eager_output(model, x)
        cos = {rt: min_row_cosine(build(model, x, rt)(x), ref) for rt in ("int8_dynamic", "onnxruntime_int8")}
        print(name, cos)
        assert all(c > INT8_MIN_COSINE for c in cos.values()), (name, cos)
        other = make() if name == "resnet" else BertModel(bert_cfg("sdpa")).eval()  # new random weights
        with torch.no_grad():
            for p in other.parameters():
                p.add_(torch.randn_like(p))
        if name != "slim_bert":
            assert min_row_cosine(eager_output(other, x), ref) < INT8_MIN_COSINE


@pytest.mark.parametrize("name", ["bert", "slim_bert"])
def test_compile_artifact_matches_eager(tmp_path, name: str) -> None:
    model = MODELS[name]()
    folder = str(tmp_path / "art")
    path = save_artifact(model, inputs_of(model, 2), folder, "compile")
    assert path.endswith("model.compile.json")
    x = inputs_of(model, 3)
    assert relative_error(load_artifact(folder, "compile")(x), eager_output(model, x)) <= FP32_TOL


def test_child_process_timer_returns_the_samples_asked_for(tmp_path) -> None:
    """Every runtime's latency path: each artifact timed in its own worker process."""
    model = tiny_bert()
    x = inputs_of(model, 2)
    folder = str(tmp_path / "art")
    for rt in RUNTIMES:  # one folder holds all five artifacts
        save_artifact(model, x, folder, rt)
    res = time_artifacts(
        {rt: Artifact(folder, rt) for rt in RUNTIMES}, x, threads=1, warmup=1, rounds=3, repeats=2
    )
    assert list(res) == list(RUNTIMES)
    for rt, r in res.items():
        assert r.n == 6 and len(r.samples_ms) == 6 and all(s > 0 for s in r.samples_ms), rt
        assert r.threads == 1 and r.shapes == [[2, 11], [2, 11]] and r.timer == f"child:{rt}"
        assert r.dtype == ("int8" if "int8" in rt else "float32")
    lo, hi = ratio_ci(res["eager"], res["onnxruntime"])
    assert 0 < lo <= hi


def test_bad_input_is_one_input_error_line(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for call, kind in (
        (lambda: load_artifact(str(empty)), PathNotFoundError),
        (lambda: load_artifact(str(tmp_path / "missing")), PathNotFoundError),
        (lambda: get_runtime("tensorrt"), UnknownRuntimeError),
        (
            lambda: save_artifact(tiny_bert(), inputs_of(tiny_bert(), 2), str(tmp_path / "x"), "tensorrt"),
            UnknownRuntimeError,
        ),
        (lambda: time_artifacts({"a": Artifact(str(empty), "onnxruntime")}, torch.zeros(1, 3)), InputError),
    ):
        with pytest.raises(kind) as e:
            call()
        assert isinstance(e.value, InputError) and "\n" not in str(e.value), str(e.value)
    assert "tensorrt" in str(pytest.raises(UnknownRuntimeError, get_runtime, "tensorrt").value)
    # A folder with another runtime's artifact names what it holds.
    model = tiny_bert()
    save_artifact(model, inputs_of(model, 2), str(tmp_path / "e"), "eager")
    with pytest.raises(PathNotFoundError, match="holds no onnxruntime artifact"):
        load_artifact(str(tmp_path / "e"), "onnxruntime")
    os.remove(tmp_path / "e" / "layout.json")
    with pytest.raises(PathNotFoundError, match="incomplete"):
        load_artifact(str(tmp_path / "e"), "eager")


def test_a_runtime_that_is_not_installed_names_its_extra() -> None:
    class Missing(Runtime):
        name = "onnxruntime"
        modules = ("hawada_no_such_module",)
        extra = "onnx"

    with pytest.raises(RuntimeMissingError, match=r"pip install 'hawada\[onnx\]'") as e:
        Missing().require()
    assert "\n" not in str(e.value)
    get_runtime("onnxruntime").require()  # installed here: no error
