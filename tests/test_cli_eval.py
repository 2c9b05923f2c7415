"""`hawada eval DIR`: the run's summary table for a run's slim model, what can be known for a bare
save_slim folder, and one line with exit code 2 for a folder that is not a slim model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

import hawada
from hawada.cli import main
from hawada.core.export import param_count
from hawada.run.report import format_report
from tests.helpers import save_tiny_vit, tiny_digits_recipe, tiny_resnet


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def slim_resnet():
    """A tiny ResNet with about half of every gated structure closed, exported."""
    gated = hawada.attach(copy.deepcopy(tiny_resnet()), hawada.GateConfig())
    store = hawada.gates(gated)
    with torch.no_grad():
        store.logits.copy_(torch.where(torch.arange(store.logits.numel()) % 2 == 0, 3.0, -3.0))
    return hawada.export(gated.eval(), hawada.ExportPolicy())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny run (digits, ResNet-18) through `hawada optimize`."""
    tmp = tmp_path_factory.mktemp("evalrun")
    out = tmp / "run"
    recipe = tiny_digits_recipe(
        name="eval",
        train={"steps": 2, "probe_every": 0},
        target={"ratio": 0.9, "batch_size": 2},
        proxy={"mode": "analytic", "calib_points": 2},
        search={"multiples": [1], "modes": ["floor"]},
        finetune={"steps": 1, "eval_every": 1, "bn_recalib_batches": 0},
        measure={"max_repeats": 3},
        output={"dir": str(out)},
    )
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    torch.set_num_threads(1)
    assert main(["optimize", str(tmp / "r.yaml")]) == 0
    return out


def test_eval_of_a_runs_slim_model_prints_the_runs_summary(run_dir, capsys) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    table = format_report(report)
    assert "channels per block" in table and "speedup" in table
    for target in (run_dir / "slim", run_dir):  # the slim folder, or the run folder itself
        code, out, err = run_cli(capsys, "eval", str(target), "--batch-size", "2")
        assert code == 0, err
        assert out.startswith(table + "\n")
        assert "latency now:" in out and "report: " in out


def test_eval_of_a_bare_save_slim_folder_says_what_is_known_and_missing(tmp_path, capsys) -> None:
    slim = slim_resnet()
    hawada.save_slim(slim, str(tmp_path / "m"))
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "m"), "--batch-size", "2")
    assert code == 0, err
    rows = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("-") and " " in line)
    assert rows["family"].startswith("resnet")
    assert rows["parameters"].strip() == f"{param_count(slim):,}"
    kept = [
        b.conv1.out_channels for stage in (slim.layer1, slim.layer2, slim.layer3, slim.layer4) for b in stage
    ]
    assert "channels per block" in out and " ".join(map(str, kept)) in out
    assert "latency (now)" in out and " ms (p20-p80 " in out
    assert "no report.json" in out and "speedup" not in out.replace("speedup and", "")


def test_eval_of_a_bare_vit_folder_lists_heads_and_ffn_per_layer(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    model = save_tiny_vit(tmp_path / "vit", num_labels=3)
    hawada.save_slim(model, str(tmp_path / "m"))
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "m"))
    assert code == 0, err
    assert "hf_encoder" in out
    assert [line.split()[-2:] for line in out.splitlines() if line.startswith("heads per layer")] == [
        ["4", "4"]
    ]
    assert [line.split()[-2:] for line in out.splitlines() if line.startswith("FFN per layer")] == [
        ["64", "64"]
    ]


def test_eval_json_prints_the_latency_measured_now(tmp_path, capsys) -> None:
    hawada.save_slim(slim_resnet(), str(tmp_path / "m"))
    code, out, _ = run_cli(capsys, "eval", str(tmp_path / "m"), "--json", "--batch-size", "2")
    assert code == 0 and json.loads(out)["median_ms"] > 0


def test_eval_refuses_what_is_not_a_slim_model_in_one_line(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "layout.json").write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "layout.json").write_text("[1, 2]")
    (tmp_path / "file.txt").write_text("x")
    hawada.save_slim(slim_resnet(), str(tmp_path / "run" / "slim"))
    (tmp_path / "run" / "report.json").write_text('{"name": "x"}')
    cases = {
        "empty": "is not a saved slim model",
        "bad": "is not valid JSON",
        "list": "names no model family",
        "file.txt": "model folder not found",
        "missing": "model folder not found",
        "run/slim": "is not a HawAda report",
    }
    for name, message in cases.items():
        code, out, err = run_cli(capsys, "eval", str(tmp_path / name))
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and message in err and err.startswith("hawada: error: "), (name, err)
        assert out == ""
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "empty"), "--batch-size", "0")
    assert code == 2 and err.count("\n") == 1


def test_eval_of_a_bare_llama_folder_lists_heads_kv_heads_and_ffn(tmp_path, capsys) -> None:
    transformers = pytest.importorskip("transformers")
    from tests.test_lm_job import tiny_teacher

    tiny_teacher(str(tmp_path / "llama"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama")).eval()
    hawada.save_slim(model, str(tmp_path / "m"))
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "m"))
    assert code == 0, err
    rows = {
        line.split(" per layer")[0]: line.split()[-2:] for line in out.splitlines() if " per layer" in line
    }
    assert rows == {"heads": ["6", "6"], "KV heads": ["2", "2"], "FFN": ["72", "72"]}
    assert "hf_decoder" in out
