"""Whole-store gate kernels: sampling/probabilities, penalties + expected widths, projection.

Each op is one launch over the flat logits vector of a GateStore. The segment table is the
store's buffers: ``seg_id [N]`` (int64), ``gate_size [N]``, ``seg_units [S]``, ``seg_cost [S]``
(fp32), ``seg_start [S]`` and ``seg_min_keep [S]`` (int64). ``tau`` is read from a 0-d tensor so
that no value ever travels to the host.

Modes (``MODE``): 0 ``hard_concrete``, 1 ``sigmoid``, 2 ``ste``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _prob(lg, tau, log_ratio, MODE: tl.constexpr):
    # P(gate != 0): hard_concrete sigmoid(l) (its location is shifted by tau log(-gamma/zeta));
    # otherwise sigmoid(l / tau)
    if MODE == 0:
        return tl.sigmoid(lg)
    else:
        return tl.sigmoid(lg / tau)


@triton.jit
def gate_fwd_kernel(
    l_ptr, noise_ptr, tau_ptr, out_ptr, N, gamma, zeta, log_ratio,
    SAMPLE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    if SAMPLE == 0:
        z = _prob(lg, tau, log_ratio, MODE)
    elif MODE == 1:
        z = tl.sigmoid(lg / tau)
    elif MODE == 2:
        p = tl.sigmoid(lg / tau)
        u = tl.load(noise_ptr + offs, mask=ok, other=1.0).to(tl.float32)
        hard = (u < p).to(tl.float32)
        z = hard + p - p  # same rounding as the reference's hard + p - p.detach()
    else:
        u = tl.load(noise_ptr + offs, mask=ok, other=0.5).to(tl.float32)
        u = tl.minimum(tl.maximum(u, 1e-6), 1.0 - 1e-6)
        s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + lg + tau * log_ratio) / tau)
        z = tl.minimum(tl.maximum(s * (zeta - gamma) + gamma, 0.0), 1.0)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def gate_bwd_kernel(
    l_ptr, noise_ptr, tau_ptr, gz_ptr, gl_ptr, N, gamma, zeta, log_ratio,
    SAMPLE: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    lg = tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gz = tl.load(gz_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tau = tl.load(tau_ptr).to(tl.float32)
    if SAMPLE == 1 and MODE == 0:
        u = tl.load(noise_ptr + offs, mask=ok, other=0.5).to(tl.float32)
        u = tl.minimum(tl.maximum(u, 1e-6), 1.0 - 1e-6)
        s = tl.sigmoid((tl.log(u) - tl.log(1.0 - u) + lg + tau * log_ratio) / tau)
        pre = s * (zeta - gamma) + gamma
        inside = ((pre >= 0.0) & (pre <= 1.0)).to(tl.float32)  # torch.clamp passes the bounds
        d = inside * (zeta - gamma) * s * (1.0 - s) / tau
    else:
        # probabilities of every mode, sigmoid samples, and the straight-through gradient of ste
        p = _prob(lg, tau, log_ratio, MODE)
        if MODE == 0:
            d = p * (1.0 - p)
        else:
            d = p * (1.0 - p) / tau
    tl.store(gl_ptr + offs, (gz * d).to(gl_ptr.dtype.element_ty), mask=ok)


@triton.jit
def penalty_fwd_kernel(
    l_ptr, seg_id_ptr, gsize_ptr, seg_units_ptr, seg_cost_ptr, tau_ptr, exp_ptr, stats_ptr,
    N, S, log_ratio, w_l0, w_floor, floor_frac, w_bim,
    MODE: tl.constexpr, COST_W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One program: segment sums need every gate before the keep-floor term can be formed.

    ``stats`` = [total, l0, floor, bimodal, l0 denominator]; ``exp`` = expected units per segment.
    """
    tau = tl.load(tau_ptr).to(tl.float32)
    so = tl.arange(0, BLOCK_S)
    for s0 in range(0, S, BLOCK_S):
        tl.store(exp_ptr + s0 + so, tl.zeros((BLOCK_S,), tl.float32), mask=s0 + so < S)
    tl.debug_barrier()
    num = tl.zeros((BLOCK,), tl.float32)
    den = tl.zeros((BLOCK,), tl.float32)
    bim = tl.zeros((BLOCK,), tl.float32)
    offs0 = tl.arange(0, BLOCK)
    for i0 in range(0, N, BLOCK):
        offs = i0 + offs0
        ok = offs < N
        p = _prob(tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32), tau, log_ratio, MODE)
        gs = tl.load(gsize_ptr + offs, mask=ok, other=0.0)
        sid = tl.load(seg_id_ptr + offs, mask=ok, other=0)
        w = gs
        if COST_W:
            w = gs * tl.load(seg_cost_ptr + sid, mask=ok, other=0.0)
        num += tl.where(ok, p * w, 0.0)
        den += w
        bim += tl.where(ok, p * (1.0 - p), 0.0)
        tl.atomic_add(exp_ptr + sid, p * gs, mask=ok)
    tl.debug_barrier()
    fl = tl.zeros((BLOCK_S,), tl.float32)
    for s0 in range(0, S, BLOCK_S):
        ok = s0 + so < S
        # read back through an atomic so the value comes from L2, where the atomics landed
        e = tl.atomic_add(exp_ptr + s0 + so, tl.zeros((BLOCK_S,), tl.float32), mask=ok)
        units = tl.load(seg_units_ptr + s0 + so, mask=ok, other=1.0)
        short = tl.maximum(floor_frac * units - e, 0.0) / units
        fl += tl.where(ok, short * short, 0.0)
    den_s = tl.sum(den, axis=0)
    l0 = tl.sum(num, axis=0) / tl.maximum(den_s, 1e-12)
    floor = tl.sum(fl, axis=0) / S
    bimodal = tl.sum(bim, axis=0) / N
    tl.store(stats_ptr + 0, w_l0 * l0 + w_floor * floor + w_bim * bimodal)
    tl.store(stats_ptr + 1, l0)
    tl.store(stats_ptr + 2, floor)
    tl.store(stats_ptr + 3, bimodal)
    tl.store(stats_ptr + 4, den_s)


@triton.jit
def penalty_bwd_kernel(
    l_ptr, seg_id_ptr, gsize_ptr, seg_units_ptr, seg_cost_ptr, tau_ptr, exp_ptr, stats_ptr,
    gstats_ptr, gexp_ptr, gl_ptr,
    N, S, log_ratio, w_l0, w_floor, floor_frac, w_bim,
    MODE: tl.constexpr, COST_W: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tau = tl.load(tau_ptr).to(tl.float32)
    p = _prob(tl.load(l_ptr + offs, mask=ok, other=0.0).to(tl.float32), tau, log_ratio, MODE)
    gs = tl.load(gsize_ptr + offs, mask=ok, other=0.0)
    sid = tl.load(seg_id_ptr + offs, mask=ok, other=0)
    g_total = tl.load(gstats_ptr + 0)
    c_l0 = g_total * w_l0 + tl.load(gstats_ptr + 1)
    c_fl = g_total * w_floor + tl.load(gstats_ptr + 2)
    c_bi = g_total * w_bim + tl.load(gstats_ptr + 3)
    den = tl.maximum(tl.load(stats_ptr + 4), 1e-12)
    w = gs
    if COST_W:
        w = gs * tl.load(seg_cost_ptr + sid, mask=ok, other=0.0)
    e = tl.load(exp_ptr + sid, mask=ok, other=0.0)
    units = tl.load(seg_units_ptr + sid, mask=ok, other=1.0)
    gap = floor_frac * units - e
    short = tl.maximum(gap, 0.0) / units
    d_e = tl.where(gap > 0.0, -2.0 * short / units / S, 0.0) * c_fl
    d_e += tl.load(gexp_ptr + sid, mask=ok, other=0.0)
    dp = c_l0 * w / den + d_e * gs + c_bi * (1.0 - 2.0 * p) / N
    if MODE == 0:
        dl = dp * p * (1.0 - p)
    else:
        dl = dp * p * (1.0 - p) / tau
    tl.store(gl_ptr + offs, dl, mask=ok)


@triton.jit
def project_kernel(
    l_ptr, seg_start_ptr, min_keep_ptr, N, S, clip, margin,
    BI: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """One program per segment: clamp, then raise gates of rank < min_keep to >= margin.

    A gate's rank counts the gates of its segment before it in a stable descending order
    (larger value, or equal value and lower index). Raising the top gates never changes which
    gates are the top ones, so reading partly updated values gives the same decisions.
    """
    s = tl.program_id(0)
    start = tl.load(seg_start_ptr + s)
    stop = tl.load(seg_start_ptr + s + 1, mask=s + 1 < S, other=N)
    cnt = stop - start
    keep = tl.load(min_keep_ptr + s)
    base = l_ptr + start
    ri = tl.arange(0, BI)
    rj = tl.arange(0, BJ)
    for i0 in range(0, cnt, BI):
        oi = i0 + ri
        oki = oi < cnt
        v = tl.load(base + oi, mask=oki, other=0.0)
        v = tl.minimum(tl.maximum(v, -clip), clip)
        rank = tl.zeros((BI,), tl.int32)
        if keep > 0:
            for j0 in range(0, cnt, BJ):
                oj = j0 + rj
                okj = oj < cnt
                vj = tl.load(base + oj, mask=okj, other=0.0)
                vj = tl.minimum(tl.maximum(vj, -clip), clip)
                before = (vj[None, :] > v[:, None]) | (
                    (vj[None, :] == v[:, None]) & (oj[None, :] < oi[:, None])
                )
                rank += tl.sum((before & okj[None, :]).to(tl.int32), axis=1)
        v = tl.where(rank < keep, tl.maximum(v, margin), v)
        tl.store(base + oi, v, mask=oki)
