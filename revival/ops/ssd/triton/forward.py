"""Chunkwise SSD forward in Triton (the algorithm in `revival.ops.ssd`'s module doc), without the D skip term.

Two kernels:
1. `_walk_kernel`, one program per (P-tile, batch*head) walking the chunks in order: stores the state entering
   each chunk, S <- exp(a_L) S + (x * exp(a_L - a) dt)^T B, and the final state (the backward walks it in reverse).
2. `_output_kernel`, every (chunk, batch*head, P-tile) in parallel:
   y = (C B^T * causal decay * dt_s) x + exp(a) * C S^T.
a is the cumulative log decay dt * A inside the chunk. A transposed operand of a matrix product is always loaded
transposed from memory, never `tl.trans` of a computed tile (fla #640). Positions past T load as zeros (dt = 0): they
change nothing. Packed documents (optional (n, T) int8 starts): the masks of chunkwise.py, from the gated delta
rule's `document_masks`. Layout: x (n, T, H, P), B, C (n, T, G, N), dt (n, T, H) float32, contiguous; head h reads
group h // (H // G); states (n*H, NC, P, N) float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...delta_rule.triton.forward import document_masks, launch, load_cols, load_rows


@triton.jit
def chunk_tokens(row, c, T, H, G, L: tl.constexpr):
    """Token indices into (n, T, H) and into (n, T, G) (the head's group) of chunk c of batch*head `row`, and which
    are < T."""
    t = c * L + tl.arange(0, L)
    b = row // H
    h = row % H
    tokens = (b * T + t).to(tl.int64)
    return tokens * H + h, tokens * G + h // (H // G), t < T


@triton.jit
def load_decay(dt_ptr, A_ptr, row, H, tokens, valid):
    """dt (0 past T), the cumulative log decay a = cumsum(dt * A) in the chunk, and its total."""
    dt = tl.load(dt_ptr + tokens, mask=valid, other=0.0)
    log_a = dt * tl.load(A_ptr + row % H)
    return dt, tl.cumsum(log_a, 0), tl.sum(log_a, 0)


@triton.jit
def decay_matrix(a, same, L: tl.constexpr):
    """exp(a_t - a_s) for s <= t within one document (`same`), else 0; (L_t, L_s)."""
    offs = tl.arange(0, L)
    return tl.exp(tl.where((offs[:, None] >= offs[None, :]) & same, a[:, None] - a[None, :], float("-inf")))


@triton.jit
def state_tile(row, c, NC, P, N, BP: tl.constexpr, BN: tl.constexpr, ip, TRANSPOSED: tl.constexpr, i_n):
    """Offsets and mask of the (P-tile ip, N-tile i_n) of the state entering chunk c in a (n*H, NC, P, N) buffer, as
    a (BP, BN) tile or (TRANSPOSED) a (BN, BP) one. One return: compiled Triton refuses two returns of different
    shapes (BP != BN) even under a constexpr branch; the interpreter does not."""
    offs_p = ip * BP + tl.arange(0, BP)
    offs_n = i_n * BN + tl.arange(0, BN)
    base = (row.to(tl.int64) * NC + c) * P * N
    if TRANSPOSED:
        offsets = base + offs_n[:, None] + offs_p[None, :] * N
        mask = (offs_n < N)[:, None] & (offs_p < P)[None, :]
    else:
        offsets = base + offs_p[:, None] * N + offs_n[None, :]
        mask = (offs_p < P)[:, None] & (offs_n < N)[None, :]
    return offsets, mask


@triton.jit
def _walk_kernel(
    u_ptr, dt_ptr, A_ptr, v_ptr, starts_ptr, s_first_ptr, states_ptr, s_last_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """One (P-tile, batch*head) walking the chunks: forwards (u = x, v = B) the state entering each chunk,
    S <- exp(a_L) S + (x * exp(a_L - a) dt)^T B; backwards (REVERSE, u = dy, v = C) the gradient of the state at
    each chunk's end, dS <- exp(a_L) dS + (dy exp(a))^T C. Stores each chunk's value before its update, and the last."""
    ip = tl.program_id(0)
    row = tl.program_id(1)
    first, mask = state_tile(row, 0, 1, P, N, BP, BN, ip, False, 0)
    S = tl.load(s_first_ptr + first, mask=mask, other=0.0)
    for i in range(0, NC):
        c = NC - 1 - i if REVERSE else i
        here, _ = state_tile(row, c, NC, P, N, BP, BN, ip, False, 0)
        tl.store(states_ptr + here, S, mask=mask)
        tokens, group_tokens, valid = chunk_tokens(row, c, T, H, G, L)
        dt, a, a_total = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
        _, from_state, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
        weight = tl.exp(a) * from_state if REVERSE else tl.exp(a_total - a) * dt * to_end
        uT = load_cols(u_ptr, tokens, valid, P, BP, ip * BP) * weight[None, :]
        vm = load_rows(v_ptr, group_tokens, valid, N, BN, 0)
        S = tl.exp(a_total) * keeps * S + tl.dot(uT, vm, input_precision=PRECISION)
    tl.store(s_last_ptr + first, S, mask=mask)


@triton.jit
def _output_kernel(
    x_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, starts_ptr, states_ptr, y_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    c = tl.program_id(0)
    row = tl.program_id(1)
    ip = tl.program_id(2)
    tokens, group_tokens, valid = chunk_tokens(row, c, T, H, G, L)
    dt, a, _ = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
    Cm = load_rows(c_ptr, group_tokens, valid, N, BN, 0)
    scores = tl.dot(Cm, load_cols(b_ptr, group_tokens, valid, N, BN, 0), input_precision=PRECISION)
    same, from_state, _, _ = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    scores *= decay_matrix(a, same, L) * dt[None, :]
    here, mask = state_tile(row, c, NC, P, N, BP, BN, ip, True, 0)
    ST = tl.load(states_ptr + here, mask=mask, other=0.0)
    y = tl.dot(scores, load_rows(x_ptr, tokens, valid, P, BP, ip * BP), input_precision=PRECISION)
    y += (tl.exp(a) * from_state)[:, None] * tl.dot(Cm, ST, input_precision=PRECISION)
    offs_p = ip * BP + tl.arange(0, BP)
    tl.store(y_ptr + tokens[:, None] * P + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_p < P)[None, :])


def precision(dtype: torch.dtype) -> str:
    """float32 inputs in full float32; 16-bit inputs on tf32 matrix units."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(x - 1, 0).bit_length())


def walk_chunks(u, dt, A, v, starts, S_first, L: int, block_p: int, num_warps: int, reverse: bool):
    """`_walk_kernel` over u (n, T, H, P), v (n, T, G, N), from S_first (n*H, P, N) float32: the value at every
    chunk (n*H, NC, P, N) and the last one (n*H, P, N)."""
    n, T, H, P = u.shape
    G, N = v.shape[2], v.shape[3]
    NC = triton.cdiv(T, L)
    block_p = min(block_p, pow2(P))
    states = torch.empty(n * H, NC, P, N, device=u.device, dtype=torch.float32)
    S_last = torch.empty(n * H, P, N, device=u.device, dtype=torch.float32)
    launch(_walk_kernel, (triton.cdiv(P, block_p), n * H),  # dt stands in for absent starts: never read
        u, dt, A, v, dt if starts is None else starts, S_first, states, S_last, T, H, G, NC, P, N, L=L, BP=block_p,
        BN=pow2(N), PRECISION=precision(u.dtype), HAS_STARTS=starts is not None, REVERSE=reverse, num_warps=num_warps)
    return states, S_last


def ssd_forward(x, dt, A, B, C, S0, starts, L: int, cfg):
    """x (n, T, H, P), B, C (n, T, G, N) contiguous, one dtype; dt (n, T, H), A (H,) float32; S0 (n*H, P, N)
    float32; starts (n, T) int8 document starts or None; L a power of two; cfg a complete LaunchConfig. Returns
    y (like x, without D), the final state (n*H, P, N) and the chunk states (n*H, NC, P, N) for the backward."""
    n, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, L)
    states, S_T = walk_chunks(x, dt, A, B, starts, S0, L, cfg.block_p_states, cfg.warps_states, reverse=False)
    y = torch.empty_like(x)
    block_p = min(cfg.block_p_output, pow2(P))
    launch(_output_kernel, (NC, n * H, triton.cdiv(P, block_p)),  # dt stands in for absent starts
        x, dt, A, B, C, dt if starts is None else starts, states, y, T, H, G, NC, P, N, L=L, BP=block_p,
        BN=pow2(N), PRECISION=precision(x.dtype), HAS_STARTS=starts is not None, num_warps=cfg.warps_output)
    return y, S_T, states
