"""Property-based: malformed recipes and CLI arguments given to ``hawada optimize`` always end
with exit code 2 and exactly one line on stderr, never a traceback."""

import copy
import dataclasses
import os
import subprocess
import sys
import tempfile
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hawada.cli import main
from hawada.config import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {
    "progress": False,
    "data": {"kind": "digits", "image_size": 16, "batch_size": 8},
    "teacher": {"epochs": 0},
    "train": {"steps": 2},
}
SECTIONS = {f.name: f.type for f in dataclasses.fields(Recipe)}
HINTS = typing.get_type_hints(Recipe)


def _fields(section: str) -> dict:
    tp = HINTS[section]
    return typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=5,
)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=10)


@st.composite
def bad_recipes(draw) -> object:
    """A recipe with at least one certain fault, plus random (maybe valid) changes."""
    r = copy.deepcopy(BASE)
    sections = sorted(k for k in SECTIONS if _fields(k))
    for _ in range(draw(st.integers(0, 2))):  # random changes, valid or not
        sec = draw(st.sampled_from(sections))
        key = draw(st.sampled_from(sorted(_fields(sec))))
        r.setdefault(sec, {})[key] = draw(values)
    fault = draw(st.sampled_from(["unknown", "type", "range", "section", "top"]))
    sec = draw(st.sampled_from(sections))
    if fault == "unknown":
        where = r if draw(st.booleans()) else r.setdefault(sec, {})
        key = "zz" + draw(names)
        where[key] = draw(values)
    elif fault == "type":  # a mapping is never a valid scalar or list setting
        key = draw(
            st.sampled_from(sorted(k for k, t in _fields(sec).items() if typing.get_origin(t) is not dict))
        )
        r.setdefault(sec, {})[key] = {"x": draw(values)}
    elif fault == "range":
        num = {
            k: f
            for k, f in ((f.name, f) for f in dataclasses.fields(HINTS["train"]))
            if f.metadata.get("lo") is not None
        }
        key = draw(st.sampled_from(sorted(num)))
        r.setdefault("train", {})[key] = float(num[key].metadata["lo"]) - draw(st.integers(1, 10**6))
    elif fault == "section":
        r[sec] = draw(
            st.one_of(
                st.integers(), st.text(min_size=1, max_size=5), st.lists(scalars, min_size=1, max_size=2)
            )
        )
    else:
        return draw(
            st.one_of(
                st.lists(values, min_size=1, max_size=3),
                st.integers(),
                st.text(min_size=1, max_size=6).map(lambda s: s + ":\n - : ["),
            )
        )
    return r


def _one_line_exit_2(argv: list[str], capsys) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.count("\n") == 1 and err.startswith("hawada: error: ") and "Traceback" not in err, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=bad_recipes())
def test_malformed_recipes_exit_2_with_one_line(recipe, capsys):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "r.yaml")
        with open(path, "w") as f:
            f.write(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
        _one_line_exit_2(["optimize", path, "--set", f"output.dir={d}/out"], capsys)
        assert not os.path.exists(os.path.join(d, "out")) and not os.path.exists(
            os.path.join(d, "out.partial")
        )


tokens = st.one_of(
    st.sampled_from(
        ["--set", "--resume", "--bogus", "-x", "=", "a=b", "train.steps=x", "zz.q=1", "--points", "nan"]
    ),
    st.text(alphabet="abcdefghij./=_-0123456789 ", min_size=1, max_size=12).filter(
        lambda s: not s.startswith("-h") and s.strip("-") != "" and not s.startswith("--h")
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(tokens, max_size=5))
def test_malformed_cli_arguments_exit_2_with_one_line(args, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names from the strategy never point at a real file
    _one_line_exit_2(["optimize", *args], capsys)


def test_malformed_recipe_in_a_real_process(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, "train": {"steps": 0, "lr_gatez": 1}}))
    p = subprocess.run(
        [sys.executable, "-m", "hawada", "optimize", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("hawada: error: ")
