import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from hawada.adapters.base import UnknownModelError
from hawada.adapters.hf_decoder import VocabMismatchError
from hawada.adapters.hf_decoder_files import CheckpointError as DecoderCheckpointError
from hawada.cli import input_error_line, main
from hawada.config import RecipeError, apply_overrides, load_recipe, recipe_from_dict
from hawada.core.checkpoint import CheckpointError
from hawada.core.distributed import ShardError
from hawada.core.export import ExportError, ExportRequestError
from hawada.core.loop import NonFiniteError
from hawada.data.lm import DataError as LMDataError
from hawada.data.text import TextDataError
from hawada.data.vision import DataError as VisionDataError
from hawada.errors import InputError, PathNotFoundError
from hawada.ops.backend import BackendUnavailableError
from hawada.run.folder import OutputError
from hawada.run.setup import TargetError
from tests.helpers import tiny_digits_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(p)


def test_defaults_and_shipped_recipes_validate():
    r = recipe_from_dict({})
    assert r.model.family == "resnet" and r.target.ratio == 0.5
    for sub in ("cpu", "H100", "H200"):
        d = os.path.join(ROOT, "recipes", sub)
        for f in sorted(os.listdir(d)):
            load_recipe(os.path.join(d, f))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"trian": {"steps": 3}}, "unknown key 'trian'; did you mean 'train'?"),
        ({"train": {"stpes": 3}}, "unknown key 'train.stpes'; did you mean 'train.steps'?"),
        ({"train": {"steps": "many"}}, "train.steps: expected an integer, got 'many'"),
        ({"train": {"steps": 0}}, "train.steps: must be >= 1, got 0"),
        ({"target": {"ratio": 1.5}}, "target.ratio: must be <= 1, got 1.5"),
        ({"gates": {"mode": "magic"}}, "gates.mode: expected one of"),
        ({"train": 3}, "train: expected a mapping"),
        ({"search": {"modes": ["up"]}}, "search.modes[0]: expected one of"),
        ({"target": {"ratio": None}}, "target: give ratio or latency_ms"),
        ({"data": {"kind": "imagefolder"}}, "data.path"),
        ({"kd": {"alpha_hidden": -0.5}}, "kd.alpha_hidden: must be >= 0, got -0.5"),
        ({"search": {"fill_probes": -1}}, "search.fill_probes: must be >= 0, got -1"),
        ({"model": {"dropout": 1.0}}, "model.dropout: must be <= 0.9, got 1.0"),
        ({"distributed": {"timeout_s": 5}}, "distributed.timeout_s: must be >= 60, got 5.0"),
    ],
)
def test_schema_errors_name_the_field(data, message):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides():
    d = apply_overrides({"train": {"steps": 5}}, ["train.steps=7", "search.multiples=[1, 2]", "name=x"])
    assert d == {"train": {"steps": 7}, "search": {"multiples": [1, 2]}, "name": "x"}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(RecipeError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(write(tmp_path, "a: [1, 2\nb: 3\n"))
    with pytest.raises(RecipeError, match="expected a mapping of sections"):
        load_recipe(write(tmp_path, "- 1\n- 2\n"))


def run_cli(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.family=transformer3000"], "unknown model family 'transformer3000'"),
        (
            ["data.kind=imagefolder", "data.path=/nonexistent/imagenet"],
            "dataset folder not found: /nonexistent",
        ),
        (["model.path=/nonexistent/w.safetensors"], "model.path: file not found"),
        (["model.arch=resnet9000"], "unknown torchvision model 'resnet9000'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, overrides, message):
    out_dir = tmp_path / "out"
    sets = []
    for o in overrides + [f"output.dir={out_dir}", "teacher.epochs=0", "progress=false"]:
        sets += ["--set", o]
    code, out, err = run_cli(
        capsys, "optimize", os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"), *sets
    )
    assert code == 2
    assert err.startswith("hawada: error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_target_below_what_any_keep_set_reaches(tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, _, err = run_cli(
        capsys,
        "optimize",
        os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"),
        "--set",
        "target.latency_ms=0.0001",
        "--set",
        "teacher.epochs=0",
        "--set",
        "progress=false",
        "--set",
        "data.image_size=16",
        "--set",
        "target.batch_size=2",
        "--set",
        f"output.dir={out_dir}",
    )
    assert code == 2 and "is below the fastest allowed keep set" in err and err.count("\n") == 1
    assert not out_dir.exists() and not any(p.name.startswith("out.partial") for p in tmp_path.iterdir())


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, _, err = run_cli(
        capsys,
        "optimize",
        os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"),
        "--set",
        f"output.dir={out_dir}",
    )
    assert code == 2 and "exists and is not empty" in err
    assert (out_dir / "keep.txt").read_text() == "mine"


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = write(tmp_path, {"train": {"setps": 1}})
    p = subprocess.run(
        [sys.executable, "-m", "hawada", "optimize", bad], capture_output=True, text=True, cwd=ROOT
    )
    assert p.returncode == 2
    assert p.stderr == "hawada: error: unknown key 'train.setps'; did you mean 'train.steps'?\n"
    p = subprocess.run([sys.executable, "-m", "hawada", "optimise"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1


def test_profile_reports_keepall_latency(tmp_path, capsys):
    out = tmp_path / "p.json"
    code, stdout, _ = run_cli(
        capsys,
        "profile",
        os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"),
        "--set",
        "data.image_size=16",
        "--set",
        "target.batch_size=4",
        "--set",
        "measure.min_repeats=3",
        "--set",
        "measure.budget_s=0.2",
        "--out",
        str(out),
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert res["keep_all"]["median_ms"] > 0 and res["keep_all"]["shapes"] == [[4, 3, 16, 16]]
    assert "torch" in res["versions"]


def test_hidden_state_weight_of_gate_training_defaults_to_the_fine_tune_one():
    r = recipe_from_dict({"kd": {"alpha_hidden": 2.0}})
    gates_kd = r.resolved("train").kd.for_gates()  # what LagrangeTrainer distils with
    assert r.kd.alpha_hidden == 2.0 and gates_kd.alpha_hidden == 2.0
    r = recipe_from_dict({"kd": {"alpha_hidden": 2.0, "alpha_hidden_gates": 0.0}})
    gates_kd = r.resolved("train").kd.for_gates()
    assert r.kd.alpha_hidden == 2.0 and gates_kd.alpha_hidden == 0.0


def test_a_value_error_from_inside_torch_is_a_bug_with_a_traceback(tmp_path, capsys, monkeypatch):
    """Only HawAda's input errors are one line and exit 2: a ValueError raised inside torch during
    a run (here by every BatchNorm forward) prints its traceback and exits 1."""

    def broken_batch_norm(*args, **kwargs):
        raise ValueError("batch_norm broke inside torch")

    monkeypatch.setattr(torch.nn.functional, "batch_norm", broken_batch_norm)
    out = tmp_path / "out"
    recipe = write(tmp_path, tiny_digits_recipe(output={"dir": str(out)}))
    code, _, err = run_cli(capsys, "optimize", recipe)
    assert code == 1
    assert err.startswith("Traceback") and "hawada: error" not in err
    assert err.rstrip().endswith("ValueError: batch_norm broke inside torch")
    assert "broken_batch_norm" in err  # the frame that raised is in the traceback
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    "error, line",
    [
        (RecipeError("train.steps: must be >= 1, got 0\nmore"), "train.steps: must be >= 1, got 0"),
        (PathNotFoundError("model.path: folder not found: /m"), "model.path: folder not found: /m"),
        (ExportRequestError("residual stream 'layer3' is closed"), "residual stream 'layer3' is closed"),
        (PermissionError(13, "Permission denied", "/out"), "[Errno 13] Permission denied: '/out'"),
        (NotADirectoryError(20, "Not a directory", "/f/x"), "[Errno 20] Not a directory: '/f/x'"),
        (ValueError("an internal check"), None),
        (FileNotFoundError("a path the code made up"), None),  # an OS error naming no path
        (ExportError("exported model differs from the gated model"), None),  # invariant 2: a bug
        (KeyError("x"), None),
    ],
)
def test_input_errors_are_told_from_bugs_by_class(error, line):
    assert input_error_line(error) == line


@pytest.mark.parametrize(
    "cls",
    [
        RecipeError,
        OutputError,
        TargetError,
        NonFiniteError,
        CheckpointError,
        DecoderCheckpointError,
        VisionDataError,
        LMDataError,
        TextDataError,
        VocabMismatchError,
        UnknownModelError,  # and the hf_encoder family's LayoutError, a subclass
        ShardError,
        ExportRequestError,
        BackendUnavailableError,
        PathNotFoundError,
    ],
)
def test_every_input_error_class_derives_from_input_error(cls):
    assert issubclass(cls, InputError) and issubclass(cls, ValueError)


def test_missing_paths_are_input_errors_and_file_not_found_errors():
    e = PathNotFoundError("model.path: folder not found: /nowhere")
    assert isinstance(e, FileNotFoundError) and isinstance(e, InputError)
    assert str(e) == "model.path: folder not found: /nowhere"
    assert issubclass(DecoderCheckpointError, FileNotFoundError)  # callers catching it still do
    assert not issubclass(ExportError, InputError) and issubclass(ExportRequestError, ExportError)


@pytest.mark.parametrize(
    "classes, message", [(1000, "the weights' classifier has 1000 outputs, the data 10 classes")]
)
def test_weights_whose_classifier_does_not_fit_the_data_are_one_line(tmp_path, capsys, classes, message):
    """A ResNet state dict with another classifier size (e.g. ImageNet's 1000 classes on a
    10-class data set) is the user's input: one line and exit 2, not a load_state_dict traceback."""
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=classes).state_dict(), weights)
    out_dir = tmp_path / "out"
    sets = []
    for o in [f"model.path={weights}", f"output.dir={out_dir}", "teacher.epochs=0", "progress=false"]:
        sets += ["--set", o]
    code, _, err = run_cli(capsys, "optimize", os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"), *sets)
    assert code == 2
    assert err.startswith("hawada: error: ") and message in err and err.count("\n") == 1
    assert not out_dir.exists()


def test_a_decoder_on_image_data_is_one_line(tmp_path, capsys):
    """A decoder recipe that leaves data.kind at its default (digits) names the real cause."""
    out_dir = tmp_path / "out"
    sets = []
    for o in [
        "model.family=hf_decoder",
        "model.path=" + str(tmp_path),
        f"output.dir={out_dir}",
        "progress=false",
    ]:
        sets += ["--set", o]
    code, _, err = run_cli(capsys, "optimize", os.path.join(ROOT, "recipes/cpu/resnet18_digits.yaml"), *sets)
    assert code == 2 and err.count("\n") == 1
    assert "data.kind: digits is image data, which the hf_decoder family does not take" in err
    assert not out_dir.exists()
