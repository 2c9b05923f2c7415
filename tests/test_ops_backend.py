"""The HAWADA_BACKEND switch: auto falls back silently, an explicit choice raises; import never
needs Triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hawada.ops import BackendUnavailableError, gated_linear, gated_linear_ref, resolve_backend, use_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_auto_on_cpu_is_torch_even_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("HAWADA_BACKEND", "auto")
    assert resolve_backend(torch.zeros(1)) == "torch"
    monkeypatch.setenv("HAWADA_BACKEND", "triton")
    assert resolve_backend(torch.zeros(1)) == "triton"  # TRITON_INTERPRET=1 in conftest
    monkeypatch.setenv("HAWADA_BACKEND", "torch")
    assert resolve_backend(torch.zeros(1)) == "torch"


def test_explicit_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, m = torch.randn(3, 8), torch.randn(4, 8), torch.ones(4)
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        gated_linear(x, w, None, m, "out", 1)
    with use_backend("auto"):
        torch.testing.assert_close(gated_linear(x, w, None, m, "out", 1), gated_linear_ref(x, w, None, m))


def test_bad_backend_name_is_a_one_line_value_error(monkeypatch):
    monkeypatch.setenv("HAWADA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="HAWADA_BACKEND must be one of"):
        resolve_backend(torch.zeros(1))


def test_works_without_triton_and_explicit_triton_raises():
    """A subprocess in which ``import triton`` fails: import, auto and torch work; triton raises."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        import hawada.ops as ops
        from hawada.core.gates import GateStore, GateConfig, PenaltyWeights, combined_penalty
        x, w, m = torch.randn(5, 8, requires_grad=True), torch.randn(6, 8), torch.rand(3)
        for name in ("auto", "torch"):
            with ops.use_backend(name):
                y = ops.gated_linear(x, w, None, m, "out", 2)
                y.sum().backward()
                s = GateStore(GateConfig())
                s.register("a", "ffn", 10, 4)
                combined_penalty(s, PenaltyWeights(l0=1.0)).backward()
        assert ops.triton_import_error() is not None
        try:
            with ops.use_backend("triton"):
                ops.gated_linear(x, w, None, m, "out", 2)
        except ops.BackendUnavailableError as e:
            print("RAISED", e)
        """
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RAISED HAWADA_BACKEND=triton: triton cannot be imported" in r.stdout


def test_importing_hawada_ops_does_not_import_triton_or_the_extension():
    code = (
        "import sys, hawada.ops, hawada.core.gates, hawada.core.slicing; "
        "print('triton' in sys.modules, 'hawada._C' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False False"
