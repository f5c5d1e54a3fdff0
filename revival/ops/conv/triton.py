"""The causal depthwise conv as Triton kernels in x's (B, T, D) layout, forward and hand-written backward (GPU).

Forward: one program per (T-tile, D-tile, batch row) loads each tap's shifted rows of x (the first K-1 steps read the
carried state), accumulates y = bias + sum_j w_j * padded[t + j] in float32 (float64 for float64 inputs) and applies
SiLU, one read of x and one write of y. A tap at shift s = K-1-j is live for output t while no document starts in
(t - s, t]: `alive` narrows as s grows, one int8 load of the starts per tap.

Backward: one program per (chunk of padded positions p in [-(K-1), T), D-tile, batch row) walks its chunk one time
step u at a time, each row of x and dy read once (a row is BD contiguous channels): it recomputes the pre-activation
z[u] from a window of the last K padded rows held in registers, g = dy[u] (times SiLU'(z[u]); z is not saved), adds
taps[s] * g to the window of partial d padded[u - s] and stores d padded[u - (K-1)], now complete (p < 0 is the
state's gradient). A document start resets a scalar count of steps since the last start, which masks the taps it
cuts. The chunk re-reads K-1 rows before it (warm-up) and K-1 after (outputs that still reach its last positions).
dweight / dbias are sums over (b, t): each program writes its chunk's partial sums (float32, (programs, K, D)) and torch
sums them, deterministic without atomics (~13 MB at (16, 2048, 3072)).

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
    """Forward: tiles (time steps x channels) and warps. Backward: `backward_block_d` channels per program, which
    walks `backward_chunk_t` padded positions one step at a time, `backward_rows` steps' loads issued together (its
    weight/bias partial sums cover the chunk). Not tuned yet (benchmarks/gpu_conv.py)."""

    block_t: int = 32
    block_d: int = 64
    num_warps: int = 4
    backward_rows: int = 4
    backward_block_d: int = 256
    backward_chunk_t: int = 128
    backward_num_warps: int = 2

    def __post_init__(self):
        for name in ("block_t", "block_d", "backward_block_d"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two, got {value}")
        for name in ("num_warps", "backward_rows", "backward_chunk_t", "backward_num_warps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


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
    def _push(window, new, N: tl.constexpr):
        """(new, window[0], ..., window[N-2]): the window of the last N rows one step later."""
        out = (new,)
        for i in tl.static_range(N - 1):
            out = out + (window[i],)
        return out

    @triton.jit
    def _padded_row(x_ptr, state_ptr, x_base, state_base, u, cols, cmask, T, D, sx_t, K: tl.constexpr,
                    HAS_STATE: tl.constexpr, ACC: tl.constexpr):
        """padded[u] on the channels `cols`: x[u] for 0 <= u < T, state[u + K-1] for -(K-1) <= u < 0, else 0."""
        inside = tl.where((u >= 0) & (u < T), cmask, False)  # not cmask & scalar: the interpreter makes that int32
        value = tl.load(x_ptr + x_base + u * sx_t + cols, mask=inside, other=0.0).to(ACC)
        if HAS_STATE:
            value += tl.load(state_ptr + state_base + (u + K - 1) * D + cols,
                             mask=tl.where((u < 0) & (u >= -(K - 1)), cmask, False), other=0.0).to(ACC)
        return value

    @triton.jit
    def _conv_bwd_kernel(dy_ptr, x_ptr, state_ptr, starts_ptr, w_ptr, b_ptr, dx_ptr, dstate_ptr, dw_ptr, db_ptr,
                         T, D, sx_b, sx_t, sdy_b, sdy_t, sst_b, chunk, iters,
                         K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_STARTS: tl.constexpr, SILU: tl.constexpr, NEED_DW: tl.constexpr,
                         NEED_DB: tl.constexpr, R: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
        pid_c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
        cols = pid_d * BD + tl.arange(0, BD)
        cmask = cols < D
        x_base, state_base, starts_base = b * sx_b, b * (K - 1) * D, b * sst_b
        c0 = pid_c * chunk - (K - 1)  # this program's padded positions [c0, c1); p < 0 is the state
        c1 = tl.minimum(c0 + chunk, T)
        zero = tl.zeros((BD,), dtype=ACC)
        taps = ()  # taps[s]: the weight of the tap that reads padded[u - s] for output u
        for s in tl.static_range(K):
            taps = taps + (tl.load(w_ptr + cols * K + (K - 1 - s), mask=cmask, other=0.0).to(ACC),)
        bias = zero
        if HAS_BIAS:
            bias = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
        previous = ()  # previous[i] = padded[u-1-i]
        partial = ()  # partial[i] = d padded[u-1-i] so far (outputs up to u-1 added)
        dw = ()  # dw[s]: the gradient of taps[s]
        for _ in tl.static_range(K):
            previous = previous + (zero,)
            partial = partial + (zero,)
            dw = dw + (zero,)
        db = zero
        since = tl.full((), K, tl.int32)  # steps since the last document start (K: none within reach)
        u0 = c0 - (K - 1)  # K-1 steps of warm-up: the window of padded rows and of starts before c0
        for i in range(iters):
            # R rows' loads first (the stores below may alias them for the compiler), then the walk through them
            rows, grads, starts = (), (), ()
            for r in tl.static_range(R):
                u = u0 + i * R + r
                rows = rows + (_padded_row(x_ptr, state_ptr, x_base, state_base, u, cols, cmask, T, D, sx_t, K,
                                           HAS_STATE, ACC),)
                grads = grads + (tl.load(dy_ptr + b * sdy_b + u * sdy_t + cols,
                                         mask=tl.where((u >= 0) & (u < T), cmask, False), other=0.0).to(ACC),)
                if HAS_STARTS:
                    starts = starts + (tl.load(starts_ptr + starts_base + u, mask=(u >= 0) & (u < T), other=0),)
            for r in tl.static_range(R):
                u = u0 + i * R + r
                value = rows[r]
                if HAS_STARTS:
                    since = tl.where(starts[r] != 0, 0, tl.minimum(since + 1, K))
                g = grads[r]
                if SILU:  # SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))) at the recomputed pre-activation
                    z = bias + taps[0] * value
                    for s in tl.static_range(1, K):  # tap s is cut by a start in (u - s, u]
                        z += tl.where(since >= s, taps[s] * previous[s - 1], 0.0)
                    sig = 1.0 / (1.0 + tl.exp(-z))
                    g = g * sig * (1.0 + z * (1.0 - sig))
                own = (u >= c0) & (u < c1)  # dweight, dbias: each output is counted by one program
                if NEED_DW:
                    dw_new = (dw[0] + tl.where(own, g * value, 0.0),)
                    for s in tl.static_range(1, K):
                        dw_new = dw_new + (dw[s] + tl.where(own & (since >= s), g * previous[s - 1], 0.0),)
                    dw = dw_new
                if NEED_DB:
                    db += tl.where(own, g, 0.0)
                updated = ()
                for s in tl.static_range(1, K):  # output u's gradient reaches padded[u - s] through taps[s]
                    updated = updated + (partial[s - 1] + tl.where(since >= s, taps[s] * g, 0.0),)
                partial = _push(updated + (zero,), taps[0] * g, K)
                previous = _push(previous, value, K)
                p = u - (K - 1)  # no later output reads padded[p]: its gradient is complete
                tl.store(dx_ptr + b * T * D + p * D + cols, partial[K - 1],
                         mask=tl.where((p >= c0) & (p >= 0) & (p < c1), cmask, False))
                if HAS_STATE:
                    tl.store(dstate_ptr + state_base + (p + K - 1) * D + cols, partial[K - 1],
                             mask=tl.where((p >= c0) & (p < 0), cmask, False))
        part = b * tl.num_programs(0) + pid_c
        if NEED_DW:
            for s in tl.static_range(K):
                tl.store(dw_ptr + part * K * D + (K - 1 - s) * D + cols, dw[s], mask=cmask)
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
    chunk = min(launch.backward_chunk_t, T + K - 1)
    chunks = triton.cdiv(T + K - 1, chunk)
    iters = triton.cdiv(chunk + 2 * (K - 1), launch.backward_rows)  # K-1 warm-up steps, K-1 to finish the chunk
    dx = torch.empty(B, T, D, dtype=x.dtype, device=x.device)
    dstate = None if state is None else torch.empty_like(state)
    state = state if K > 1 else None  # as in _forward; dstate stays empty
    dw = torch.empty(B * chunks, K, D, dtype=acc, device=x.device) if need_dw else None
    db = torch.empty(B * chunks, D, dtype=acc, device=x.device) if need_db else None
    grid = (chunks, triton.cdiv(D, launch.backward_block_d), B)
    _conv_bwd_kernel[grid](dy, x, x if state is None else state, x if starts is None else starts, weight,
                           weight if bias is None else bias, dx, dx if state is None else dstate,
                           dx if dw is None else dw, dx if db is None else db, T, D, x.stride(0), x.stride(1),
                           dy.stride(0), dy.stride(1), 0 if starts is None else starts.stride(0), chunk, iters, K=K,
                           HAS_STATE=state is not None, HAS_BIAS=bias is not None, HAS_STARTS=starts is not None,
                           SILU=silu, NEED_DW=need_dw, NEED_DB=need_db, R=launch.backward_rows,
                           BD=launch.backward_block_d, ACC=_acc_dtype(x), num_warps=launch.backward_num_warps)
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
