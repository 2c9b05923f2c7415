"""Gated matmul kernel: one tiled GEMM ``C = A @ B`` with the gate work fused in.

Every pass of :func:`hawada.ops.gated_linear` is this kernel with different flags:

* ``A_SCALE_K``: the K columns of A are multiplied by a per-group mask (``x * m`` of side
  ``in``; ``dy * m`` of side ``out``'s input gradient).
* ``HAS_BIAS`` then ``C_SCALE`` (1: rows, 2: columns): the epilogue adds a bias and multiplies by a
  per-group mask (``(x W^T + b) * m`` of side ``out``; ``dx * m`` of side ``in``).
* ``RED`` (1: over columns into rows, 2: over rows into columns): the epilogue atomically adds
  ``sum(acc * W)`` of the *unmasked* tile into a per-feature fp32 buffer. In the weight-gradient
  GEMM ``acc`` is ``G = dy^T x``, so this is the gate gradient ``dm_f = sum_k W[f,k] G[f,k]``
  without storing the pre-gate output.

Masks are given per group and expanded in the kernel (``feature // group``). Accumulation is fp32;
fp32 inputs use IEEE dots (no TF32) so they match the torch reference to ~1e-6.

Element offsets (index x stride) are formed in int64 (:func:`tile_offsets`): an int32 offset wraps
once it reaches 2**31 elements, e.g. row 81,920 of a ``[T, 28672]`` activation.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_offsets(rows, cols, s_r, s_c):
    """``rows[:, None] * s_r + cols[None, :] * s_c`` in int64, for 1-D index vectors ``rows``, ``cols``.

    Indices come from ``tl.arange`` (int32) and strides below 2**31 are passed as int32, so the
    product would be formed, and wrap, in int32: both indices are widened first.
    """
    return rows.to(tl.int64)[:, None] * s_r + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def gated_mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    bias_ptr,
    ma_ptr,
    mc_ptr,
    w_ptr,
    red_ptr,
    M,
    N,
    K,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    s_cm,
    s_cn,
    s_wm,
    s_wn,
    GA,
    GC,
    A_SCALE_K: tl.constexpr,
    C_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RED: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped launch order: neighbouring programs share A rows / B columns in L2
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        in_k = kk < K
        a = tl.load(
            a_ptr + tile_offsets(offs_m, kk, s_am, s_ak),
            mask=in_m[:, None] & in_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + tile_offsets(kk, offs_n, s_bk, s_bn),
            mask=in_k[:, None] & in_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if A_SCALE_K:
            ma = tl.load(ma_ptr + kk // GA, mask=in_k, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * ma[None, :]).to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    if RED != 0:
        w = tl.load(
            w_ptr + tile_offsets(offs_m, offs_n, s_wm, s_wn),
            mask=in_m[:, None] & in_n[None, :],
            other=0.0,
        ).to(tl.float32)
        if RED == 1:
            tl.atomic_add(red_ptr + offs_m, tl.sum(acc * w, axis=1), mask=in_m)
        else:
            tl.atomic_add(red_ptr + offs_n, tl.sum(acc * w, axis=0), mask=in_n)
    if C_SCALE == 1:
        acc *= tl.load(mc_ptr + offs_m // GC, mask=in_m, other=0.0).to(tl.float32)[:, None]
    if C_SCALE == 2:
        acc *= tl.load(mc_ptr + offs_n // GC, mask=in_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        c_ptr + tile_offsets(offs_m, offs_n, s_cm, s_cn),
        acc.to(c_ptr.dtype.element_ty),
        mask=in_m[:, None] & in_n[None, :],
    )


# GPU tile choices (Hopper/Ampere); the autotuner keeps the fastest per shape and flag set.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_stages=4, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=4, num_warps=4),
]

gated_mm_kernel_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["M", "N", "K", "A_SCALE_K", "C_SCALE", "HAS_BIAS", "RED", "IEEE"],
    reset_to_zero=["red_ptr"],  # the gate-gradient buffer is accumulated atomically
)(gated_mm_kernel)

# The interpreter runs each program as numpy ops: few big tiles are fastest there.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}
