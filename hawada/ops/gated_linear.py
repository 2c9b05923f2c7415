"""Gated linear: a linear layer whose output features (``side="out"``) or input features
(``side="in"``) are multiplied by per-group gates.

``gated_linear`` is registered as the custom op ``hawada::gated_linear`` (forward) with
``hawada::gated_linear_backward`` as its autograd formula, so ``torch.compile`` traces through it.
Both pick the backend per call (:mod:`hawada.ops.backend`): the Triton kernel of
:mod:`hawada.kernels.gated_mm`, or the torch reference below.

Gradients (``m`` expanded to features, ``G = dy^T x`` the unmasked weight gradient):

* side ``out``, ``y = (x W^T + b) * m``: ``dx = (dy * m) W``, ``dW = m * G`` (rows),
  ``db = m * sum_t dy``, ``dm_f = sum_k W[f,k] G[f,k] + b_f sum_t dy[t,f]`` (the gate gradient
  falls out of the dW GEMM's epilogue).
* side ``in``, ``y = (x * m) W^T + b``: ``dx = (dy W) * m``, ``dW = G * m`` (columns),
  ``db = sum_t dy``, ``dm_k = sum_n W[n,k] G[n,k]``.

Gate gradients of features that share a group are summed into that group's gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hawada.ops.backend import interpreter_on, resolve_backend


def expand_group_mask(mask: torch.Tensor, group_size: int, features: int) -> torch.Tensor:
    """``[G] -> [features]``: gate ``g`` covers features ``[g * group_size, (g + 1) * group_size)``."""
    if group_size == 1:
        return mask
    return mask.repeat_interleave(group_size)[:features]


def gated_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str = "out",
    group_size: int = 1,
) -> torch.Tensor:
    """Torch reference.

    Shapes: ``x`` ``[..., K]``, ``weight`` ``[N, K]``, ``bias`` ``[N]`` or None, ``mask``
    ``[ceil(N / group_size)]`` (side ``out``) or ``[ceil(K / group_size)]`` (side ``in``);
    returns ``[..., N]``. ``out``: ``(x W^T + b) * m``; ``in``: ``(x * m) W^T + b``.
    """
    if side == "out":
        m = expand_group_mask(mask, group_size, weight.shape[0]).to(x.dtype)
        return F.linear(x, weight, bias) * m
    if side == "in":
        m = expand_group_mask(mask, group_size, weight.shape[1]).to(x.dtype)
        return F.linear(x * m, weight, bias)
    raise ValueError(f"gated_linear side must be 'out' or 'in', got {side!r}")


def _group_sum(per_feature: torch.Tensor, group_size: int, groups: int) -> torch.Tensor:
    """``[features] -> [groups]``: sum the features of each group (the last group may be short)."""
    if group_size == 1:
        return per_feature
    pad = groups * group_size - per_feature.numel()
    return F.pad(per_feature, (0, pad)).view(groups, group_size).sum(1)


def gated_linear_backward_ref(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Torch reference of the backward: ``(dx, dW, db, dmask)`` for 2-D ``dy [T, N]``, ``x [T, K]``."""
    n, k = weight.shape
    dt = x.dtype
    acc = torch.promote_types(dt, torch.float32)  # reductions: at least fp32
    if side == "out":
        m = expand_group_mask(mask, group_size, n).to(dt)
        dym = dy * m
        dx = dym @ weight
        g = dy.t() @ x  # unmasked weight gradient
        dw = g * m[:, None]
        s = dy.to(acc).sum(0)
        db = None if bias is None else (s * m.to(acc)).to(bias.dtype)
        dm = (weight.to(acc) * g.to(acc)).sum(1)
        if bias is not None:
            dm = dm + bias.to(acc) * s
    else:
        m = expand_group_mask(mask, group_size, k).to(dt)
        dxu = dy @ weight
        dx = dxu * m
        g = dy.t() @ x
        dw = g * m[None, :]
        db = None if bias is None else dy.to(acc).sum(0).to(bias.dtype)
        dm = (weight.to(acc) * g.to(acc)).sum(0)
    return dx, dw, db, _group_sum(dm, group_size, mask.numel()).to(mask.dtype)


# ---------------------------------------------------------------------- triton path
def _launch(a, b, c, *, bias=None, ma=None, ga=1, mc=None, gc=1, c_scale=0, w=None, red=None, red_dim=0):
    """``c = a @ b`` (2-D views, any strides) with the fused gate flags of ``gated_mm_kernel``."""
    from hawada.kernels import gated_mm as km

    M, K = a.shape
    N = b.shape[1]
    dummy = c
    interp = interpreter_on()
    args = (
        a, b, c,
        bias if bias is not None else dummy,
        ma if ma is not None else dummy,
        mc if mc is not None else dummy,
        w if w is not None else dummy,
        red if red is not None else dummy,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        w.stride(0) if w is not None else 0, w.stride(1) if w is not None else 0,
        ga, gc,
    )  # fmt: skip
    flags = dict(
        A_SCALE_K=ma is not None,
        C_SCALE=c_scale,
        HAS_BIAS=bias is not None,
        RED=red_dim if red is not None else 0,
        # the interpreter's bf16/fp16 dot is wrong: accumulate from fp32 tiles there
        UPCAST=interp and a.dtype != torch.float32,
        IEEE=a.dtype == torch.float32,
    )
    if interp or a.device.type != "cuda":
        cfg = km.INTERPRETER_CONFIG
        grid = (triton_cdiv(M, cfg["BLOCK_M"]) * triton_cdiv(N, cfg["BLOCK_N"]),)
        km.gated_mm_kernel[grid](*args, **flags, **cfg)
    else:

        def grid(meta):
            return (triton_cdiv(M, meta["BLOCK_M"]) * triton_cdiv(N, meta["BLOCK_N"]),)

        km.gated_mm_kernel_tuned[grid](*args, **flags)
    return c


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_triton_inputs(x, weight, bias, mask) -> None:
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(
            f"gated_linear triton path needs one dtype for x, weight and bias, got {x.dtype}, {weight.dtype}"
            + (f", {bias.dtype}" if bias is not None else "")
        )


def _fwd_triton(x2, weight, bias, mask, side, group_size):
    _check_triton_inputs(x2, weight, bias, mask)
    t, n = x2.shape[0], weight.shape[0]
    y = torch.empty((t, n), device=x2.device, dtype=x2.dtype)
    m = mask.contiguous()
    wt = weight.t()  # [K, N] view
    if side == "out":
        return _launch(x2, wt, y, bias=bias, mc=m, gc=group_size, c_scale=2)
    return _launch(x2, wt, y, bias=bias, ma=m, ga=group_size)


def _bwd_triton(dy, x2, weight, bias, mask, side, group_size, need_x, need_w, need_b, need_m):
    n, k = weight.shape
    m = mask.contiguous()
    dx = dw = db = dm = None
    if need_x:
        dx = torch.empty_like(x2)
        if side == "out":
            _launch(dy, weight, dx, ma=m, ga=group_size)
        else:
            _launch(dy, weight, dx, mc=m, gc=group_size, c_scale=2)
    if need_w or need_m:
        dw = torch.empty_like(weight)
        red = torch.zeros(n if side == "out" else k, device=dy.device, dtype=torch.float32)
        if side == "out":
            _launch(dy.t(), x2, dw, mc=m, gc=group_size, c_scale=1, w=weight, red=red, red_dim=1)
        else:
            _launch(dy.t(), x2, dw, mc=m, gc=group_size, c_scale=2, w=weight, red=red, red_dim=2)
        dm = red
    if bias is not None and (need_b or need_m):
        s = dy.sum(0, dtype=torch.float32)
        if side == "out":
            db = (s * expand_group_mask(m, group_size, n).float()).to(bias.dtype)
            if need_m:
                dm = dm + bias.float() * s
        else:
            db = s.to(bias.dtype)
    if dm is not None:
        dm = _group_sum(dm, group_size, mask.numel()).to(mask.dtype)
    return dx, dw, db, dm


# ---------------------------------------------------------------------- custom ops
def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.library.custom_op("hawada::gated_linear", mutates_args=())
def _gated_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str,
    group_size: int,
) -> torch.Tensor:
    tensors = (x, weight, mask) + ((bias,) if bias is not None else ())
    # empty problems have no grid to launch: the reference handles them
    if resolve_backend(*tensors) == "torch" or x.numel() == 0 or weight.numel() == 0:
        return gated_linear_ref(x, weight, bias, mask, side, group_size)
    y = _fwd_triton(_flat(x), weight, bias, mask, side, group_size)
    return y.view(*x.shape[:-1], weight.shape[0])


@_gated_linear_op.register_fake
def _(x, weight, bias, mask, side, group_size):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("hawada::gated_linear_backward", mutates_args=())
def _gated_linear_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str,
    group_size: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """``[dx, dW, db, dmask]``; an entry not asked for in ``needs`` is an empty tensor."""
    dy2, x2 = _flat(dy), _flat(x)
    tensors = (dy, x, weight, mask) + ((bias,) if bias is not None else ())
    if resolve_backend(*tensors) == "torch" or x.numel() == 0 or weight.numel() == 0:
        dx, dw, db, dm = gated_linear_backward_ref(dy2, x2, weight, bias, mask, side, group_size)
    else:
        dx, dw, db, dm = _bwd_triton(dy2, x2, weight, bias, mask, side, group_size, *needs)
    outs = []
    for need, g, like in zip(needs, (dx, dw, db, dm), (x, weight, bias, mask)):
        if need and g is not None:
            outs.append(g.reshape(like.shape))
        else:
            outs.append(x.new_empty(0))
    return outs


@_gated_linear_bwd_op.register_fake
def _(dy, x, weight, bias, mask, side, group_size, needs):
    likes = (x, weight, bias, mask)
    return [
        torch.empty_like(t) if need and t is not None else x.new_empty(0) for need, t in zip(needs, likes)
    ]


def _setup(ctx, inputs, output):
    x, weight, bias, mask, side, group_size = inputs
    ctx.save_for_backward(x, weight, bias, mask)
    ctx.side, ctx.group_size = side, group_size


def _backward(ctx, dy):
    x, weight, bias, mask = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in range(4)]
    if bias is None:
        needs[2] = False
    g = _gated_linear_bwd_op(dy.contiguous(), x, weight, bias, mask, ctx.side, ctx.group_size, needs)
    return (*[gi if need else None for gi, need in zip(g, needs)], None, None)


_gated_linear_op.register_autograd(_backward, setup_context=_setup)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    side: str = "out",
    group_size: int = 1,
) -> torch.Tensor:
    """Gated linear (see :func:`gated_linear_ref` for shapes); dispatches to the selected backend.

    Under autocast the inputs are cast to the autocast dtype first, as ``F.linear`` would.
    """
    if side not in ("out", "in"):
        raise ValueError(f"gated_linear side must be 'out' or 'in', got {side!r}")
    if group_size < 1:
        raise ValueError(f"gated_linear group_size must be >= 1, got {group_size}")
    feats = weight.shape[0] if side == "out" else weight.shape[1]
    if mask.dim() != 1 or mask.numel() != -(-feats // group_size):
        raise ValueError(
            f"gated_linear mask must have ceil({feats} / {group_size}) entries, got shape {tuple(mask.shape)}"
        )
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    return _gated_linear_op(x, weight, bias, mask, side, int(group_size))
