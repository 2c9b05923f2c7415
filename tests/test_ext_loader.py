"""Import never fails: a missing, broken or stale extension logs one warning and the Python
paths are used (simulated in fresh interpreters); switching it off logs nothing."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Uses what consults the extension: slicing, latency (twice) and, with EXPORT, a ResNet export.
SCRIPT = r"""
import json, os, torch, hawada
from hawada.ops import slice_many
from hawada.core.profiler import measure_latency_ms
out = slice_many([torch.arange(12.).view(3, 4)], [torch.tensor([2, 0])], [torch.tensor([1])])
if os.environ.get("EXPORT"):
    import torchvision
    gated = hawada.attach(torchvision.models.resnet18(num_classes=4))
    with torch.no_grad():
        hawada.gates(gated).logits.copy_(torch.randn(hawada.gates(gated).logits.shape) + 0.5)
    slim = hawada.export(gated, example_inputs=torch.randn(1, 3, 32, 32))
lat = measure_latency_ms(torch.nn.Linear(4, 4), torch.randn(2, 4), min_repeats=3, max_repeats=3)
lat2 = measure_latency_ms(torch.nn.Linear(4, 4), torch.randn(2, 4), min_repeats=3, max_repeats=3)
print(json.dumps({"slice": out[0].flatten().tolist(), "timer": [lat.timer, lat2.timer],
                  "ext": hawada._ext.available()}))
"""


def run(env_extra: dict, tmp_path, script: str = SCRIPT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAWADA_")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )


def warnings_of(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if "C++ extension not used" in ln]


def check_python_path(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["slice"] == [9.0, 1.0]
    assert res["timer"] == ["perf_counter", "perf_counter"]
    assert res["ext"] is False


@pytest.mark.parametrize(
    "case, module_text, needle",
    [
        ("missing", None, "No module named"),
        ("broken", "raise OSError('undefined symbol: _ZN2at6TensorC1Ev')\n", "undefined symbol"),
        ("stale", "ABI_VERSION = 0\nTORCH_VERSION = 'x'\n", "stale"),
    ],
)
def test_missing_broken_or_stale_extension_warns_once(tmp_path, case, module_text, needle):
    name = f"hawada_fake_ext_{case}"
    if module_text is not None:
        (tmp_path / f"{name}.py").write_text(module_text)
    p = run({"HAWADA_EXT_MODULE": name, **({"EXPORT": "1"} if case == "missing" else {})}, tmp_path)
    check_python_path(p)
    w = warnings_of(p)
    assert len(w) == 1, p.stderr
    assert needle in w[0]


@pytest.mark.parametrize("env", [{"HAWADA_EXT": "off"}, {"HAWADA_BACKEND": "torch"}])
def test_switched_off_is_silent(tmp_path, env):
    p = run({**env, "HAWADA_EXT_MODULE": "hawada_no_such_module"}, tmp_path)
    check_python_path(p)
    assert warnings_of(p) == []


def test_require_raises_on_use_but_import_works(tmp_path):
    script = (
        "import hawada, torch\n"
        "from hawada.ops import slice_many\n"
        "try:\n    slice_many([torch.ones(2)], [None], [None])\n"
        "except ImportError as e:\n    print('raised', type(e).__name__, e)\n"
    )
    p = run({"HAWADA_EXT": "require", "HAWADA_EXT_MODULE": "hawada_no_such_module"}, tmp_path, script)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "raised ExtensionError HAWADA_EXT=require but cannot import hawada_no_such_module" in p.stdout
