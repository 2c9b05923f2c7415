"""gated_linear: Triton kernel (interpreter on CPU, real on GPU) and torch paths vs the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from hawada.kernels.gated_mm import tile_offsets
from hawada.ops import gated_linear, gated_linear_backward_ref, gated_linear_ref, use_backend


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-abs error relative to the reference's max magnitude."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius-norm relative error: the stable measure for low-precision comparisons (a max over a
    few thousand bf16 roundings is decided by single elements)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make(t, k, n, side, group, dtype=torch.float32, device="cpu", bias=True):
    feats = n if side == "out" else k
    g = torch.Generator().manual_seed(t * 7 + k + n + group)
    x = torch.randn(t, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    m = torch.rand(-(-feats // group), generator=g, dtype=torch.float64)
    m[::3] = 0.0  # closed gates, as after pruning decisions
    dy = torch.randn(t, n, generator=g, dtype=torch.float64)
    cast = [v.to(device, dtype) if v is not None else None for v in (x, w, b)]
    return (*cast, m.to(device, torch.float32), dy.to(device, dtype))


def run(backend, x, w, b, m, dy, side, group):
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in (x, w, b, m)]
    with use_backend(backend):
        y = gated_linear(*leaves, side, group)
        grads = torch.autograd.grad(y, [v for v in leaves if v is not None], dy)
    return y.detach(), grads


def eager(x, w, b, m, dy, side, group):
    """The same-dtype eager composition (F.linear, mul, autograd's reductions)."""
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in (x, w, b, m)]
    y = gated_linear_ref(*leaves, side, group)
    return y.detach(), torch.autograd.grad(y, [v for v in leaves if v is not None], dy)


def ref64(x, w, b, m, dy, side, group):
    """fp64 reference output and gradients (autograd through the reference)."""
    leaves = [v.detach().double().requires_grad_() if v is not None else None for v in (x, w, b)]
    mm = m.detach().double().requires_grad_()
    y = gated_linear_ref(*leaves, mm, side, group)
    grads = torch.autograd.grad(y, [v for v in leaves if v is not None] + [mm], dy.double())
    return y.detach(), grads


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("group", [1, 16, 128])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_fp32_matches_reference_small_odd(side, group, bias):
    args = make(33, 255, 129, side, group, bias=bias)
    x, w, b, m, dy = args
    y, g = run("triton", x, w, b, m, dy, side, group)
    yr, gr = run("torch", x, w, b, m, dy, side, group)
    assert rel(y, yr) <= 1e-5
    assert len(g) == len(gr) == (4 if bias else 3)
    for a, r in zip(g, gr):
        assert rel(a, r) <= 1e-5
    # the gate gradient is not trivially zero
    assert g[-1].abs().max() > 0


@pytest.mark.parametrize("side,group", [("out", 16), ("in", 128)])
def test_triton_fp32_matches_reference_97x1023x257(side, group):
    x, w, b, m, dy = make(97, 1023, 257, side, group)
    y, g = run("triton", x, w, b, m, dy, side, group)
    yr, gr = run("torch", x, w, b, m, dy, side, group)
    assert rel(y, yr) <= 1e-5
    for a, r in zip(g, gr):
        assert rel(a, r) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side", ["out", "in"])
def test_triton_low_precision_within_twice_torch_error(dtype, side):
    # on CPU the interpreter upcasts the tiles (its bf16/fp16 dot is wrong); accumulation is fp32
    x, w, b, m, dy = make(33, 255, 129, side, 16, dtype=dtype)
    y, g = run("triton", x, w, b, m, dy, side, 16)
    yt, gt = eager(x, w, b, m, dy, side, 16)
    y64, g64 = ref64(x, w, b, m, dy, side, 16)
    assert y.dtype == dtype and g[0].dtype == dtype and g[-1].dtype == torch.float32
    tiny = 1e-6
    assert rel_l2(y, y64) <= 2 * rel_l2(yt, y64) + tiny
    for a, t, r in zip(g, gt, g64):
        assert rel_l2(a, r) <= 2 * rel_l2(t, r) + tiny


def test_batched_input_and_partial_grads():
    x, w, b, m, dy = make(30, 64, 48, "out", 16)
    x3, dy3 = x.view(2, 15, 64), dy.view(2, 15, 48)
    m_leaf = m.clone().requires_grad_()
    for backend in ("triton", "torch"):
        with use_backend(backend):
            y = gated_linear(x3, w, b, m_leaf, "out", 16)  # only the mask needs a gradient
            (gm,) = torch.autograd.grad(y, [m_leaf], dy3)
        yr = gated_linear_ref(x3, w, b, m_leaf, "out", 16)
        (gmr,) = torch.autograd.grad(yr, [m_leaf], dy3)
        assert y.shape == (2, 15, 48)
        assert rel(y, yr.detach()) <= 1e-5 and rel(gm, gmr) <= 1e-5


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("group", [1, 16, 128])
def test_torch_backward_formulas_match_autograd(side, group):
    x, w, b, m, dy = make(19, 200, 131, side, group, dtype=torch.float64)
    m = m.double()
    dx, dw, db, dm = gated_linear_backward_ref(dy, x, w, b, m, side, group)
    xs = [v.clone().requires_grad_() for v in (x, w, b, m)]
    gr = torch.autograd.grad(gated_linear_ref(*xs, side, group), xs, dy)
    for a, r in zip((dx, dw, db, dm), gr):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_bad_input_raises_one_line_value_error():
    x, w, b, m, _ = make(4, 32, 16, "out", 1)
    with pytest.raises(ValueError, match="side"):
        gated_linear(x, w, b, m, "middle", 1)
    with pytest.raises(ValueError, match="mask"):
        gated_linear(x, w, b, m[:3], "out", 1)


def test_torch_compile_fullgraph_traces_through_the_op():
    """fullgraph=True fails on any graph break, so this proves the custom op is traceable."""
    x, w, b, m, dy = make(8, 32, 24, "out", 8)

    def f(x, w, b, m):
        return gated_linear(torch.relu(x), w, b, torch.sigmoid(m), "out", 8).sum()

    leaves = [v.clone().requires_grad_() for v in (x, w, b, m)]
    with use_backend("torch"):
        # aot_eager: Dynamo + AOTAutograd (fake tensors, the registered autograd) without C++ codegen
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
        g = torch.autograd.grad(out, leaves)
    ref = [v.clone().requires_grad_() for v in (x, w, b, m)]
    g_ref = torch.autograd.grad(f(*ref), ref)
    assert rel(out.detach(), f(*ref).detach()) <= 1e-6
    for a, r in zip(g, g_ref):
        assert rel(a, r) <= 1e-6


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_on_cpu():
    """The same with Inductor's C++ code generation (about 50 s on a busy 2-core CPU, hence slow)."""
    x, w, b, m, dy = make(8, 32, 24, "out", 8)

    def f(x, w, b, m):
        return gated_linear(torch.relu(x), w, b, torch.sigmoid(m), "out", 8).sum()

    leaves = [v.clone().requires_grad_() for v in (x, w, b, m)]
    with use_backend("torch"):
        out = torch.compile(f, fullgraph=True)(*leaves)
        g = torch.autograd.grad(out, leaves)
    ref = [v.clone().requires_grad_() for v in (x, w, b, m)]
    g_ref = torch.autograd.grad(f(*ref), ref)
    for a, r in zip(g, g_ref):
        assert rel(a, r) <= 1e-5


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("group", [1, 16, 128])
def test_gpu_matches_reference_97x1023x257(dtype, side, group):
    x, w, b, m, dy = make(97, 1023, 257, side, group, dtype=dtype, device="cuda")
    y, g = run("triton", x, w, b, m, dy, side, group)
    if dtype == torch.float32:
        yr, gr = run("torch", x, w, b, m, dy, side, group)
        assert rel(y, yr) <= 1e-5
        for a, r in zip(g, gr):
            assert rel(a, r) <= 1e-5
        return
    yt, gt = eager(x, w, b, m, dy, side, group)
    y64, g64 = ref64(x, w, b, m, dy, side, group)
    assert rel_l2(y, y64) <= 2 * rel_l2(yt, y64) + 1e-6
    for a, t, r in zip(g, gt, g64):
        assert rel_l2(a, r) <= 2 * rel_l2(t, r) + 1e-6


@pytest.mark.gpu
def test_gpu_compile_inductor_with_triton_backend():
    x, w, b, m, dy = make(64, 256, 192, "in", 16, device="cuda")

    def f(x, w, b, m):
        return gated_linear(x, w, b, m, "in", 16)

    with use_backend("triton"):
        y = torch.compile(f, fullgraph=True)(x, w, b, m)
    assert rel(y, gated_linear_ref(x, w, b, m, "in", 16)) <= 1e-5


def test_gated_linear_module_routes_through_the_op_on_both_backends():
    """core.hooks.GatedLinear (the adapters' gated linears) trains through the op: the gate
    gradient reaches the store's flat logits and both backends agree."""
    from torch import nn

    from hawada.core.gates import GateConfig, GateStore
    from hawada.core.hooks import gate_linear

    store = GateStore(GateConfig(init_logit=0.5))
    store.register("fc.out", "ffn", 40, 16)
    lin = nn.Linear(24, 40)
    gate_linear(lin, store, "fc.out", "out")
    x, noise = torch.randn(5, 24), torch.rand(len(store))
    res = {}
    for backend in ("torch", "triton"):
        with use_backend(backend):
            store.train()
            store._mask = store.sample(noise)  # the same gates for both backends
            y = lin(x)
            (g,) = torch.autograd.grad(y.square().sum(), store.logits)
        res[backend] = (y.detach(), g)
    assert g.abs().max() > 0
    for a, r in zip(res["triton"], res["torch"]):
        assert rel(a, r) <= 1e-5


def test_empty_batch_on_the_triton_backend():
    x, w, b, m, _ = make(4, 32, 16, "in", 16)
    with use_backend("triton"):
        y = gated_linear(x[:0], w, b, m, "in", 16)
    assert y.shape == (0, 16)


# ---------------------------------------------------------------------- offsets past 2**31
@triton.jit
def _offsets_probe(out_ptr, r0, c0, s_r, s_c, BR: tl.constexpr, BC: tl.constexpr):
    """Store ``tile_offsets`` of rows ``r0 + [0, BR)`` and columns ``c0 + [0, BC)``."""
    rows = r0 + tl.arange(0, BR)
    cols = c0 + tl.arange(0, BC)
    local = tl.arange(0, BR)[:, None] * BC + tl.arange(0, BC)[None, :]
    tl.store(out_ptr + local, tile_offsets(rows, cols, s_r, s_c))


@pytest.mark.parametrize(
    "r0, c0, s_r, s_c",
    [
        (81_920 - 8, 28_672 - 8, 28_672, 1),  # the last rows of a [81920, 28672] activation
        (28_672 - 8, 81_920 - 8, 1, 28_672),  # the same matrix read transposed (dy^T in the dW GEMM)
        (3, 5, 2**31 - 1, 2**30),  # strides just below 2**31, passed as int32
    ],
)
def test_tile_offsets_are_exact_past_2_31(r0, c0, s_r, s_c):
    br = bc = 8
    out = torch.empty(br, bc, dtype=torch.int64)
    _offsets_probe[(1,)](out, r0, c0, s_r, s_c, BR=br, BC=bc)
    rows = torch.arange(r0, r0 + br, dtype=torch.int64)[:, None]
    cols = torch.arange(c0, c0 + bc, dtype=torch.int64)[None, :]
    want = rows * s_r + cols * s_c
    assert int(want.max()) >= 2**31  # the case int32 offsets get wrong
    assert torch.equal(out, want)


def strided_view_case() -> None:
    """Forward and backward of a ``[3, 64]`` fp16 view whose rows lie 2**30 + 64 elements apart, so
    that row 2 starts past 2**31 elements; prints ``ok`` or ``skip: ...``. The buffer is
    reserved, not touched (only the three rows' pages are written): it needs a few MiB of memory
    but 4 GiB of address space."""
    k, n, stride = 64, 48, 2**30 + 64
    try:
        buf = torch.empty(2 * stride + k, dtype=torch.float16)
    except RuntimeError as e:
        print(f"skip: cannot reserve 4 GiB of address space ({e})")
        return
    x = buf.as_strided((3, k), (stride, 1))
    g = torch.Generator().manual_seed(1)
    x.copy_(torch.randn(3, k, generator=g))
    w = (torch.randn(n, k, generator=g) / k**0.5).half()
    m = torch.rand(n, generator=g)
    dy = torch.randn(3, n, generator=g).half()
    xl, wl = x.detach().requires_grad_(), w.clone().requires_grad_()  # xl keeps x's strides
    with use_backend("triton"):
        y = gated_linear(xl, wl, None, m, "out", 1)
        dx, dw = torch.autograd.grad(y, [xl, wl], dy)  # dW reads x (the B side) with the same stride
    xr, wr = x.detach().float().requires_grad_(), w.float().requires_grad_()
    yr = gated_linear_ref(xr, wr, None, m, "out", 1)
    dxr, dwr = torch.autograd.grad(yr, [xr, wr], dy.float())
    errors = {"y": rel(y, yr), "dx": rel(dx, dxr), "dw": rel(dw, dwr)}
    assert max(errors.values()) <= 5e-3, errors
    print("ok")


def test_kernel_reads_rows_past_2_31_elements_of_a_strided_view():
    """:func:`strided_view_case` in a child process: with int32 offsets the kernel reads 4 GiB
    before the buffer, which ends the process with a segmentation fault, not a failed assert."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "from tests.test_ops_gated_linear import strided_view_case; strided_view_case()"
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, f"exit code {p.returncode}: {p.stderr[-3000:]}"
    if p.stdout.startswith("skip"):
        pytest.skip(p.stdout.strip())
    assert p.stdout.strip().endswith("ok"), p.stdout
