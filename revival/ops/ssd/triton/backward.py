"""Chunkwise SSD backward in Triton: two kernels (notation of forward.py; a = cumsum(dt A) in the chunk).

1. forward.py's `_walk_kernel` walking the chunks backwards: stores the gradient of the state at the end of each
   chunk, dS <- exp(a_L) dS + (dy exp(a))^T C; what is left is the initial state's gradient.
2. `_grads_kernel`, every (chunk, batch*head) in parallel, from the chunk's entering state S and end gradient dS':
       dx = (B C^T * decay^T * dt) dy + (exp(a_L - a) dt) B dS'^T
       dC = (dy x^T * decay * dt_s) B + exp(a) dy S
       dB = (x dy^T * decay^T * dt) C + (exp(a_L - a) dt) x dS'
   and dt through its factor and through a (a's gradient: the pairs (t, s) of the scores give +row sum -column sum,
   the entering state +exp(a_t) dy_t . S C_t, the end state through a_L - a_s and exp(a_L)), then
   da = reverse cumsum, ddt += A da, dA = sum dt da.
Every transposed operand is computed from operands loaded transposed from memory (x dy^T beside dy x^T, B C^T beside
C B^T), never `tl.trans` of a computed tile (fla #640). dB and dC come per head and are summed over each group's heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import (
    chunk_tokens,
    document_masks,
    launch,
    load_cols,
    load_decay,
    load_rows,
    pow2,
    precision,
    state_tile,
    walk_chunks,
)


@triton.jit
def _grads_kernel(
    x_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, starts_ptr, states_ptr, dstates_ptr, dy_ptr,
    dx_ptr, ddt_ptr, db_ptr, dc_ptr, da_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    c = tl.program_id(0)
    row = tl.program_id(1)
    tokens, group_tokens, valid = chunk_tokens(row, c, T, H, G, L)
    dt, a, a_total = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
    offs = tl.arange(0, L)
    same, from_state, to_end_mask, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    causal = (offs[:, None] >= offs[None, :]) & same
    decay = tl.exp(tl.where(causal, a[:, None] - a[None, :], float("-inf")))  # [t, s]
    causal_T = (offs[None, :] >= offs[:, None]) & same
    decay_T = tl.exp(tl.where(causal_T, a[None, :] - a[:, None], float("-inf")))  # [s, t]
    Bm = load_rows(b_ptr, group_tokens, valid, N, BN, 0)
    Cm = load_rows(c_ptr, group_tokens, valid, N, BN, 0)
    offs_n = tl.arange(0, BN)
    mask_n = valid[:, None] & (offs_n < N)[None, :]
    to_end = tl.exp(a_total - a) * dt * to_end_mask
    from_start = tl.exp(a) * from_state
    dx_scores = decay_T * dt[:, None] * tl.dot(Bm, load_cols(c_ptr, group_tokens, valid, N, BN, 0),
                                                input_precision=PRECISION)  # [s, t]

    # dx one P-tile at a time (BP wide), and everything else that sums over P
    dy_x = tl.zeros((L, L), tl.float32)  # [t, s] = dy_t . x_s
    x_dy = tl.zeros((L, L), tl.float32)  # [s, t]
    dy_S = tl.zeros((L, BN), tl.float32)  # dy S
    x_dS = tl.zeros((L, BN), tl.float32)  # x dS'
    dy_y_state = tl.zeros((L,), tl.float32)  # dy_t . (the entering state's part of y_t)
    S_dS = tl.zeros((BN,), tl.float32)  # column sums of S * dS'
    for start in range(0, P, BP):
        x = load_rows(x_ptr, tokens, valid, P, BP, start)
        dy = load_rows(dy_ptr, tokens, valid, P, BP, start)
        here, mask = state_tile(row, c, NC, P, N, BP, BN, start // BP, False)
        here_T, mask_T = state_tile(row, c, NC, P, N, BP, BN, start // BP, True)
        dx = tl.dot(dx_scores, dy, input_precision=PRECISION)
        dx += to_end[:, None] * tl.dot(Bm, tl.load(dstates_ptr + here_T, mask=mask_T, other=0.0),
                                       input_precision=PRECISION)
        offs_p = start + tl.arange(0, BP)
        tl.store(dx_ptr + tokens[:, None] * P + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_p < P)[None, :])
        dy_x += tl.dot(dy, load_cols(x_ptr, tokens, valid, P, BP, start), input_precision=PRECISION)
        x_dy += tl.dot(x, load_cols(dy_ptr, tokens, valid, P, BP, start), input_precision=PRECISION)
        S = tl.load(states_ptr + here, mask=mask, other=0.0)
        dS_end = tl.load(dstates_ptr + here, mask=mask, other=0.0)
        dy_S += tl.dot(dy, S, input_precision=PRECISION)
        x_dS += tl.dot(x, dS_end, input_precision=PRECISION)
        S_dS += tl.sum(S * dS_end, 0)
        y_state = tl.dot(Cm, tl.load(states_ptr + here_T, mask=mask_T, other=0.0), input_precision=PRECISION)
        dy_y_state += tl.sum(dy * y_state, 1)

    dC = tl.dot(decay * dy_x * dt[None, :], Bm, input_precision=PRECISION) + from_start[:, None] * dy_S
    tl.store(dc_ptr + tokens[:, None] * N + offs_n[None, :], dC, mask=mask_n)
    dB = tl.dot(decay_T * x_dy * dt[:, None], Cm, input_precision=PRECISION) + to_end[:, None] * x_dS
    tl.store(db_ptr + tokens[:, None] * N + offs_n[None, :], dB, mask=mask_n)

    C_B = tl.dot(Cm, load_cols(b_ptr, group_tokens, valid, N, BN, 0), input_precision=PRECISION)  # [t, s]
    pairs = decay * C_B * dy_x  # d(loss)/d(dt_s) of the scores, per (t, s)
    r = tl.sum(Bm * x_dS, 1)  # x_s . dS' B_s
    ddt = tl.sum(pairs, 0) + tl.exp(a_total - a) * to_end_mask * r
    pairs *= dt[None, :]  # now d(loss)/d(a_t - a_s)
    da_point = from_start * dy_y_state + tl.sum(pairs, 1) - tl.sum(pairs, 0) - to_end * r
    da_total = tl.exp(a_total) * keeps * tl.sum(S_dS, 0) + tl.sum(to_end * r, 0)
    da_point += tl.where(offs == L - 1, da_total, 0.0)
    da = tl.cumsum(da_point, 0, reverse=True)
    ddt += tl.load(A_ptr + row % H) * da
    tl.store(da_ptr + row.to(tl.int64) * NC + c, tl.sum(dt * da, 0))
    tl.store(ddt_ptr + tokens, ddt, mask=valid)


def ssd_backward(x, dt, A, B, C, starts, states, dy, dS_T, L: int, cfg):
    """Gradients of ssd_forward's (y, final state) with respect to x, dt, A, B, C and the initial state."""
    n, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, L)
    BP, BN = pow2(P), pow2(N)
    f32 = dict(device=x.device, dtype=torch.float32)
    dstates, dS0 = walk_chunks(dy, dt, A, C, starts, dS_T, L, cfg.block_p_dstates, cfg.warps_dstates, reverse=True)
    documents = dict(HAS_STARTS=starts is not None)
    starts = dt if starts is None else starts  # any tensor when HAS_STARTS is off: never read
    dx = torch.empty_like(x)
    ddt = torch.empty(n, T, H, **f32)
    dB_heads, dC_heads = torch.empty(n, T, H, N, **f32), torch.empty(n, T, H, N, **f32)
    dA_chunks = torch.empty(n * H, NC, **f32)
    launch(_grads_kernel, (NC, n * H),
        x, dt, A, B, C, starts, states, dstates, dy, dx, ddt, dB_heads, dC_heads, dA_chunks, T, H, G, NC, P, N,
        L=L, BP=min(cfg.block_p_grads, BP), BN=BN, PRECISION=precision(x.dtype), num_warps=cfg.warps_grads, **documents)
    dB = dB_heads.reshape(n, T, G, H // G, N).sum(3).to(B.dtype)
    dC = dC_heads.reshape(n, T, G, H // G, N).sum(3).to(C.dtype)
    dA = dA_chunks.reshape(n, H, NC).sum((0, 2))
    return dx, ddt, dA, dB, dC, dS0
