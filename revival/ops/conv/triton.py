"""The causal depthwise conv as Triton kernels in x's (B, T, D) layout, forward and hand-written backward (GPU).

Forward: one program per (T-tile, D-tile, batch row) loads each tap's shifted rows of x (the first K-1 steps read the
carried state), accumulates y = bias + sum_j w_j * padded[t + j] in float32 (float64 for float64 inputs) and applies
SiLU, one read of x and one write of y. A tap at shift s = K-1-j is live for output t while no document starts in
(t - s, t]: `alive` narrows as s grows, one int8 load of the starts per tap.

Backward: one program per (chunk of padded positions p in [-(K-1), T), D-tile, batch row) walks its chunk in tiles.
With g = dy (times SiLU' of the recomputed pre-activation: it is not saved), d padded[p] = sum_j w_j g[p + s_j] over
the taps live at output p + s_j; p < 0 is the state's gradient. dweight / dbias are sums over (b, t): each program
writes its chunk's partial sums (float32, (programs, K, D)) and torch sums them, deterministic without atomics; the
chunks keep that buffer small (~7 MB at (16, 2048, 3072)).

The kernels take x, dy with any (batch, time) strides and channel stride 1; weight (D, K), bias, state are made
contiguous. `launch` sets tiles and warps (`LaunchConfig`); results do not depend on them beyond rounding order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton import HAVE_TRITON, available

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["LaunchConfig", "available", "causal_conv1d_triton"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles (time steps x channels) and warps of the conv kernels; `backward_chunk_t` padded positions per backward
    program (its weight/bias partial sums cover them). Not tuned yet (benchmarks/gpu_conv.py)."""

    block_t: int = 32
    block_d: int = 64
    num_warps: int = 4
    backward_block_t: int = 32
    backward_block_d: int = 64
    backward_chunk_t: int = 256
    backward_num_warps: int = 4


if HAVE_TRITON:

    @triton.jit
    def _pre_activation(x_ptr, state_ptr, starts_ptr, w_ptr, b_ptr, x_base, state_base, starts_base, rows, cols,
                        cmask, T, D, sx_t, K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_STARTS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        """bias + sum_j w_j * padded[t + j] at output rows `rows` (zero outside [0, T)), in ACC."""
        acc = tl.zeros((BT, BD), dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        alive = (rows >= 0) & (rows < T)
        for s in tl.static_range(K):
            if HAS_STARTS:
                if s > 0:  # a start at t - s + 1 cuts every tap reaching t - s or earlier
                    at = rows - s + 1
                    start = tl.load(starts_ptr + starts_base + at, mask=alive & (at >= 0), other=0)
                    alive = alive & (start == 0)
            w = tl.load(w_ptr + cols * K + (K - 1 - s), mask=cmask, other=0.0).to(ACC)
            src = rows - s
            value = tl.load(x_ptr + x_base + src[:, None] * sx_t + cols[None, :],
                            mask=(alive & (src >= 0))[:, None] & cmask[None, :], other=0.0).to(ACC)
            if HAS_STATE:
                if s > 0:  # padded[t + j] with t + j < K - 1 is state[t + j]
                    value += tl.load(state_ptr + state_base + (rows + K - 1 - s)[:, None] * D + cols[None, :],
                                     mask=(alive & (src < 0))[:, None] & cmask[None, :], other=0.0).to(ACC)
            acc += w[None, :] * value
        return acc

    @triton.jit
    def _conv_fwd_kernel(x_ptr, state_ptr, starts_ptr, w_ptr, b_ptr, y_ptr, T, D, sx_b, sx_t, sst_b,
                         K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_STARTS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                         ACC: tl.constexpr):
        pid_t, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        rows = pid_t * BT + tl.arange(0, BT)
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        acc = _pre_activation(x_ptr, state_ptr, starts_ptr, w_ptr, b_ptr, b * sx_b, b * (K - 1) * D, b * sst_b,
                              rows, cols, cmask, T, D, sx_t, K, HAS_STATE, HAS_BIAS, HAS_STARTS, BT, BD, ACC)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        mask = (rows < T)[:, None] & cmask[None, :]
        tl.store(y_ptr + b * T * D + rows[:, None] * D + cols[None, :], acc, mask=mask)

    @triton.jit
    def _conv_bwd_kernel(dy_ptr, x_ptr, state_ptr, starts_ptr, w_ptr, b_ptr, dx_ptr, dstate_ptr, dw_ptr, db_ptr,
                         T, D, sx_b, sx_t, sdy_b, sdy_t, sst_b, tiles,
                         K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_STARTS: tl.constexpr, SILU: tl.constexpr, NEED_DW: tl.constexpr,
                         NEED_DB: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                         ACC: tl.constexpr):
        pid_c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        taps = tl.arange(0, BK)
        x_base, state_base, starts_base = b * sx_b, b * (K - 1) * D, b * sst_b
        dw = tl.zeros((BK, BD), dtype=ACC)
        db = tl.zeros((BD,), dtype=ACC)
        for i in range(tiles):
            p = (pid_c * tiles + i) * BT - (K - 1) + tl.arange(0, BT)  # padded positions; p < 0 is the state
            inside = (p >= 0) & (p < T)
            padded = tl.load(x_ptr + x_base + p[:, None] * sx_t + cols[None, :],
                             mask=inside[:, None] & cmask[None, :], other=0.0).to(ACC)
            if HAS_STATE:
                padded += tl.load(state_ptr + state_base + (p + K - 1)[:, None] * D + cols[None, :],
                                  mask=(p < 0)[:, None] & cmask[None, :], other=0.0).to(ACC)
            dpad = tl.zeros((BT, BD), dtype=ACC)
            alive = p < T
            for s in tl.static_range(K):
                u = p + s  # the output that reads p through tap K-1-s
                if HAS_STARTS:
                    if s > 0:  # a start in (p, p + s] cuts the tap
                        start = tl.load(starts_ptr + starts_base + u, mask=(u >= 0) & (u < T), other=0)
                        alive = alive & (start == 0)
                live = alive & (u >= 0) & (u < T)
                g = tl.load(dy_ptr + b * sdy_b + u[:, None] * sdy_t + cols[None, :],
                            mask=live[:, None] & cmask[None, :], other=0.0).to(ACC)
                if SILU:  # SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))) at the recomputed pre-activation
                    z = _pre_activation(x_ptr, state_ptr, starts_ptr, w_ptr, b_ptr, x_base, state_base,
                                        starts_base, u, cols, cmask, T, D, sx_t, K, HAS_STATE, HAS_BIAS,
                                        HAS_STARTS, BT, BD, ACC)
                    sig = 1.0 / (1.0 + tl.exp(-z))
                    g = g * sig * (1.0 + z * (1.0 - sig))
                w = tl.load(w_ptr + cols * K + (K - 1 - s), mask=cmask, other=0.0).to(ACC)
                dpad += w[None, :] * g
                if NEED_DW:
                    dw += tl.where(taps[:, None] == K - 1 - s, tl.sum(g * padded, axis=0)[None, :], 0.0)
                if NEED_DB:
                    if s == 0:
                        db += tl.sum(g, axis=0)
            tl.store(dx_ptr + b * T * D + p[:, None] * D + cols[None, :], dpad,
                     mask=inside[:, None] & cmask[None, :])
            if HAS_STATE:
                tl.store(dstate_ptr + state_base + (p + K - 1)[:, None] * D + cols[None, :], dpad,
                         mask=((p < 0) & (p >= -(K - 1)))[:, None] & cmask[None, :])
        part = b * tl.num_programs(0) + pid_c
        if NEED_DW:
            tl.store(dw_ptr + part * K * D + taps[:, None] * D + cols[None, :], dw,
                     mask=(taps < K)[:, None] & cmask[None, :])
        if NEED_DB:
            tl.store(db_ptr + part * D + cols, db, mask=cmask)


# ----------------------------------------------------------------------------------------------- launches
def _acc_dtype(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels read any (batch, time) strides with channel stride 1; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(x, state, weight, bias, starts, silu, launch: LaunchConfig) -> torch.Tensor:
    B, T, D = x.shape
    K = weight.shape[1]
    y = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    state = state if K > 1 else None  # K = 1 has an empty state (its null pointer would be refused by the launcher)
    grid = (triton.cdiv(T, launch.block_t), triton.cdiv(D, launch.block_d), B)
    _conv_fwd_kernel[grid](x, x if state is None else state, x if starts is None else starts, weight,
                           weight if bias is None else bias, y, T, D, x.stride(0), x.stride(1),
                           0 if starts is None else starts.stride(0), K=K, HAS_STATE=state is not None,
                           HAS_BIAS=bias is not None, HAS_STARTS=starts is not None, SILU=silu,
                           BT=launch.block_t, BD=launch.block_d, ACC=_acc_dtype(x), num_warps=launch.num_warps)
    return y


def _backward(dy, x, state, weight, bias, starts, silu, need_dw, need_db, launch: LaunchConfig):
    B, T, D = x.shape
    K = weight.shape[1]
    dy = _channels_last(dy)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tiles = triton.cdiv(min(launch.backward_chunk_t, T + K - 1), launch.backward_block_t)
    chunks = triton.cdiv(T + K - 1, tiles * launch.backward_block_t)
    dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    dstate = None if state is None else torch.empty_like(state)
    state = state if K > 1 else None  # as in _forward; dstate stays empty
    dw = torch.empty(B * chunks, K, D, dtype=acc, device=x.device) if need_dw else None
    db = torch.empty(B * chunks, D, dtype=acc, device=x.device) if need_db else None
    grid = (chunks, triton.cdiv(D, launch.backward_block_d), B)
    _conv_bwd_kernel[grid](dy, x, x if state is None else state, x if starts is None else starts, weight,
                           weight if bias is None else bias, dx, dx if state is None else dstate,
                           dx if dw is None else dw, dx if db is None else db, T, D, x.stride(0), x.stride(1),
                           dy.stride(0), dy.stride(1), 0 if starts is None else starts.stride(0), tiles, K=K,
                           HAS_STATE=state is not None, HAS_BIAS=bias is not None, HAS_STARTS=starts is not None,
                           SILU=silu, NEED_DW=need_dw, NEED_DB=need_db, BK=triton.next_power_of_2(K),
                           BT=launch.backward_block_t, BD=launch.backward_block_d, ACC=_acc_dtype(x),
                           num_warps=launch.backward_num_warps)
    dw = None if dw is None else dw.sum(dim=0).t().to(weight.dtype).contiguous()
    db = None if db is None else db.sum(dim=0).to(bias.dtype)
    return dx, dstate, dw, db


class _CausalConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, state, weight, bias, starts, silu, launch):
        ctx.silu, ctx.launch = silu, launch
        ctx.save_for_backward(x, state, weight, bias, starts)
        return _forward(x, state, weight, bias, starts, silu, launch)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, state, weight, bias, starts = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dstate, dw, db = _backward(dy, x, state, weight, bias, starts, ctx.silu, need[2],
                                       bias is not None and need[3], ctx.launch)
        return dx, dstate, dw, db, None, None, None


def causal_conv1d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         state: torch.Tensor | None = None, *, silu: bool = False,
                         document_starts: torch.Tensor | None = None,
                         launch: LaunchConfig | None = None) -> torch.Tensor:
    """y (B, T, D) in x's dtype (SiLU'd with `silu`) from x (B, T, D), weight (D, K), bias (D,) or None, state
    (B, K-1, D) or None, document_starts (B, T) bool or None; shapes are checked by `revival.ops.conv`. The new
    state is not computed here."""
    if not available():
        raise RuntimeError("the Triton conv needs the `triton` package and a CUDA device (or TRITON_INTERPRET=1)")
    if x.dtype not in DTYPES:
        raise ValueError(f"x: expected one of {DTYPES}, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"x: impl='triton' expected T >= 1 steps, got shape {tuple(x.shape)}")
    if launch is not None and not isinstance(launch, LaunchConfig):
        raise ValueError(f"launch: expected a LaunchConfig or None, got {type(launch).__name__}")
    launch = LaunchConfig() if launch is None else launch
    x = _channels_last(x)
    weight = weight.to(x.dtype).contiguous()
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    state = None if state is None else state.to(x.dtype).contiguous()
    starts = None if document_starts is None else document_starts.contiguous().view(torch.int8)
    tensors = (x, weight) + tuple(t for t in (bias, state) if t is not None)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _CausalConvTriton.apply(x, state, weight, bias, starts, silu, launch)
    return _forward(x, state, weight, bias, starts, silu, launch)
