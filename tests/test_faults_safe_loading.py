"""Safe by default: no pickles are read or written, torch.load only with weights_only=True,
trust_remote_code never switched on by the code (audited over the package's source)."""

import ast
import os

import pytest
import torch

from hawada.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [
    os.path.join(d, f)
    for sub in ("hawada", "benchmarks")
    for d, _, fs in os.walk(os.path.join(ROOT, sub))
    for f in fs
    if f.endswith(".py")
]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


# The one module allowed to use pickle: messages between the ranks of one job, in memory
# (torch.distributed's object collectives pickle them anyway); it reads and writes no file.
PICKLE_IN_MEMORY = {os.path.join("hawada", "core", "distributed.py")}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_source_loads_nothing_unsafely(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    banned = ("dill", "cloudpickle", "joblib")
    if os.path.relpath(path, ROOT) not in PICKLE_IN_MEMORY:
        banned += ("pickle",)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m and m.split(".")[0] in banned for m in mods)
    for call in _calls(tree):
        name = _name(call.func)
        kw = {k.arg: k.value for k in call.keywords}
        if name.endswith("torch.load") or name == "load" and "map_location" in kw:
            wo = kw.get("weights_only")
            assert isinstance(wo, ast.Constant) and wo.value is True, (
                f"{path}:{call.lineno} torch.load without weights_only=True"
            )
        trc = kw.get("trust_remote_code")
        assert trc is None or (isinstance(trc, ast.Constant) and trc.value is False), f"{path}:{call.lineno}"
        if name.endswith(".save") and name.startswith("torch"):
            raise AssertionError(f"{path}:{call.lineno}: torch.save writes a pickle")


def test_checkpoint_round_trip_shares_tied_tensors_and_keeps_the_previous(tmp_path):
    w = torch.randn(4, 3)
    tensors = {"a": w, "tied": w, "s": torch.tensor(2.5)}
    p1 = save_checkpoint(str(tmp_path), 1, tensors, {"step": 1, "x": [1.5, None]})
    p2 = save_checkpoint(str(tmp_path), 2, {**tensors, "s": torch.tensor(3.0)}, {"step": 2})
    p3 = save_checkpoint(str(tmp_path), 3, tensors, {"step": 3})
    names = sorted(os.listdir(tmp_path))
    assert names == ["latest.json", os.path.basename(p2), os.path.basename(p3)]  # newest + previous
    assert not os.path.exists(p1)
    t, state, path = load_checkpoint(str(tmp_path))
    assert path == p3 and state == {"step": 3}
    assert torch.equal(t["a"], w) and t["tied"] is t["a"] and float(t["s"]) == 2.5
    # a leftover temporary (a crash mid-write) is ignored and cleaned by the next write
    (tmp_path / "step-00000004.safetensors.tmp-1").write_bytes(b"half")
    assert load_checkpoint(str(tmp_path))[2] == p3


def test_corrupted_pointer_is_one_line_naming_the_file(tmp_path):
    save_checkpoint(str(tmp_path), 1, {"a": torch.zeros(2)}, {})
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="latest.json is corrupted") as e:
        load_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value)
