"""The job registry: data kinds -> builders ``(recipe, device) -> Job``."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from types import SimpleNamespace

import pytest
import torch

import hawada.jobs.base as base
from hawada.config import DataSection
from hawada.jobs import Job, build_job, job_builder, job_kinds, register_job
from hawada.jobs.lm import build_lm_job
from hawada.jobs.text import build_text_job, build_user_text_job
from hawada.jobs.vision import build_vision_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_of(kind: str) -> SimpleNamespace:
    """A stand-in recipe: build_job reads only ``data.kind`` before calling the builder."""
    return SimpleNamespace(data=SimpleNamespace(kind=kind))


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry (built-ins loaded) that the test may change freely."""
    job_kinds()
    monkeypatch.setattr(base.JOBS, "entries", dict(base.JOBS.entries))
    return base.JOBS.entries


def test_builtin_kinds_resolve_to_their_builders() -> None:
    assert job_kinds() == ["digits", "imagefolder", "stdlib_docstrings", "stdlib_source", "text"]
    assert job_builder("digits") is build_vision_job
    assert job_builder("imagefolder") is build_vision_job
    assert job_builder("stdlib_docstrings") is build_text_job
    assert job_builder("stdlib_source") is build_lm_job
    assert job_builder("text") is build_user_text_job


def test_every_kind_a_recipe_may_name_has_a_job() -> None:
    allowed = typing.get_args(typing.get_type_hints(DataSection)["kind"])
    assert sorted(allowed) == job_kinds()


def test_the_run_uses_the_registry() -> None:
    import hawada.run.context as run_context

    assert run_context.build_job is build_job and run_context.Job is Job


def test_unknown_kind_is_one_line_naming_the_known_kinds() -> None:
    with pytest.raises(ValueError) as e:
        build_job(recipe_of("parquet"), torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg
    assert (
        msg
        == "data.kind 'parquet' has no job; known: digits, imagefolder, stdlib_docstrings, stdlib_source, text"
    )


def test_a_registered_kind_is_found(registry) -> None:
    made = []

    @register_job("toy_a", "toy_b")
    def build_toy(recipe, device):
        made.append((recipe.data.kind, device))
        return "job"

    assert {"toy_a", "toy_b"} <= set(job_kinds())
    assert job_builder("toy_b") is build_toy
    assert build_job(recipe_of("toy_a"), torch.device("cpu")) == "job"
    assert made == [("toy_a", torch.device("cpu"))]


def test_a_kind_held_by_another_builder_is_refused(registry) -> None:
    def build_other(recipe, device):
        raise AssertionError("never called")

    with pytest.raises(
        ValueError, match=r"data.kind 'digits' is already registered \(hawada\.jobs\.vision\."
    ):
        register_job("digits")(build_other)
    # all or nothing: the free kind of a refused registration is not taken either
    with pytest.raises(ValueError, match="'stdlib_source'"):
        register_job("toy_free", "stdlib_source")(build_other)
    assert "toy_free" not in job_kinds()
    assert job_builder("digits") is build_vision_job and job_builder("stdlib_source") is build_lm_job


def test_the_same_builder_registered_again_is_allowed(registry) -> None:
    # a module imported a second time re-creates its builders: same module and name, new object
    def module_body():
        @register_job("toy_again")
        def build_again(recipe, device):
            return "again"

        return build_again

    first, second = module_body(), module_body()
    assert first is not second
    assert job_builder("toy_again") is second


def test_register_job_needs_a_kind() -> None:
    with pytest.raises(ValueError, match="at least one"):
        register_job()


def test_builtin_jobs_load_without_optional_libraries() -> None:
    # the lookup imports every built-in job module: none may need torchvision, scikit-learn or
    # transformers (nor datasets) before a job of its kind is built
    code = (
        "import sys\n"
        "for m in ('torchvision', 'sklearn', 'transformers', 'safetensors', 'datasets', 'pyarrow'):\n"
        "    sys.modules[m] = None\n"
        "from hawada.jobs import job_kinds\n"
        "print(','.join(job_kinds()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "digits,imagefolder,stdlib_docstrings,stdlib_source,text"
