"""Chunkwise SSD forward in Triton (the algorithm in `revival.ops.ssd`'s module doc), D skip term included.

Two kernels, three with segments:
1. `_walk_kernel`, one program per (P-tile, batch*head, segment) walking its chunks in order: stores the state
   entering each chunk, S <- exp(a_L) S + (x * exp(a_L - a) dt)^T B, and its last one (the backward walks in reverse).
   Segmented walks (`LaunchConfig.segments` > 1: few batch*heads, long T): the transition of a chunk is a scalar,
   exp(a_L) (0 for a chunk with a document start), so the chunks split into segments walked side by side, each from
   zero but the first (from the true initial state); the walk also stores each chunk's product of its segment's
   transitions before it and each segment's whole product.
2. `_carry_kernel` (segments only), sequential over the segments: the state entering each one,
   S_j = m_{j-1} S_{j-1} + E_{j-1} (E a segment's walk from zero, m its product), and the true last state.
3. `_output_kernel`, every (chunk, batch*head, P-tile) in parallel:
   y = (C B^T * causal decay * dt_s) x + exp(a) * C S^T + D x, rounded once. With segments it first corrects the
   stored state, S += (the segment's product before the chunk) * S_j, and stores it back for the backward.
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
    u_ptr, dt_ptr, A_ptr, v_ptr, starts_ptr, s_first_ptr, states_ptr, ends_ptr, prefix_ptr, through_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    REVERSE: tl.constexpr, SEGMENTS: tl.constexpr,
):
    """One (P-tile, batch*head, segment) walking the segment's chunks: forwards (u = x, v = B) the state entering
    each chunk, S <- exp(a_L) S + (x * exp(a_L - a) dt)^T B; backwards (REVERSE, u = dy, v = C) the gradient of the
    state at each chunk's end, dS <- exp(a_L) dS + (dy exp(a))^T C. Stores each chunk's value before its update and
    the segment's last one (ends (n*H, SEGMENTS, P, N)). Segment j holds chunks [j CPS, (j + 1) CPS) (the last one
    fewer); the one walked first (0 forwards, the last backwards) starts from s_first, the others from zero. With
    SEGMENTS > 1 also each chunk's product of its segment's transitions walked before it (prefix (n*H, NC)) and the
    whole segment's (through (n*H, SEGMENTS)), for `_carry_kernel` and the correction."""
    ip = tl.program_id(0)
    row = tl.program_id(1)
    seg = tl.program_id(2)
    first, mask = state_tile(row, 0, 1, P, N, BP, BN, ip, False, 0)
    S = tl.load(s_first_ptr + first, mask=mask, other=0.0)
    if SEGMENTS > 1:
        S = tl.where(seg == (SEGMENTS - 1 if REVERSE else 0), S, 0.0)
    per_segment = tl.cdiv(NC, SEGMENTS)  # the wrapper's segment count leaves no segment empty
    lo = seg * per_segment
    count = tl.minimum(NC - lo, per_segment)
    through = 1.0
    for i in range(0, count):
        c = lo + count - 1 - i if REVERSE else lo + i
        here, _ = state_tile(row, c, NC, P, N, BP, BN, ip, False, 0)
        tl.store(states_ptr + here, S, mask=mask)
        tokens, group_tokens, valid = chunk_tokens(row, c, T, H, G, L)
        dt, a, a_total = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
        _, from_state, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
        weight = tl.exp(a) * from_state if REVERSE else tl.exp(a_total - a) * dt * to_end
        uT = load_cols(u_ptr, tokens, valid, P, BP, ip * BP) * weight[None, :]
        vm = load_rows(v_ptr, group_tokens, valid, N, BN, 0)
        transition = tl.exp(a_total) * keeps
        S = transition * S + tl.dot(uT, vm, input_precision=PRECISION)
        if SEGMENTS > 1:
            tl.store(prefix_ptr + row * NC + c, through, mask=ip == 0)  # every P-tile computes the same scalars
            through = through * transition
    end, _ = state_tile(row, seg, SEGMENTS, P, N, BP, BN, ip, False, 0)
    tl.store(ends_ptr + end, S, mask=mask)
    if SEGMENTS > 1:
        tl.store(through_ptr + row * SEGMENTS + seg, through, mask=ip == 0)


@triton.jit
def _carry_kernel(
    ends_ptr, through_ptr, s_last_ptr, P, N,
    BP: tl.constexpr, BN: tl.constexpr, REVERSE: tl.constexpr, SEGMENTS: tl.constexpr,
):
    """One (P-tile, batch*head), sequential over the segments in walk order: S_{j+1} = m_j S_j + E_j, where
    E (ends, each segment's walk from zero; the first-walked one's from the true start) becomes S_j in place, the
    value entering segment j (zero for the first-walked: its chunks are right as stored); s_last the true last."""
    ip = tl.program_id(0)
    row = tl.program_id(1)
    here, mask = state_tile(row, SEGMENTS - 1 if REVERSE else 0, SEGMENTS, P, N, BP, BN, ip, False, 0)
    S = tl.load(ends_ptr + here, mask=mask, other=0.0)
    tl.store(ends_ptr + here, tl.zeros((BP, BN), tl.float32), mask=mask)
    for i in range(1, SEGMENTS):
        j = SEGMENTS - 1 - i if REVERSE else i
        here, _ = state_tile(row, j, SEGMENTS, P, N, BP, BN, ip, False, 0)
        E = tl.load(ends_ptr + here, mask=mask, other=0.0)
        tl.store(ends_ptr + here, S, mask=mask)
        S = tl.load(through_ptr + row * SEGMENTS + j) * S + E  # through segment j: what enters the next
    first, _ = state_tile(row, 0, 1, P, N, BP, BN, ip, False, 0)
    tl.store(s_last_ptr + first, S, mask=mask)


@triton.jit
def corrected_state(states_ptr, prefix_ptr, entering_ptr, row, c, NC, P, N, BP: tl.constexpr, BN: tl.constexpr,
                    ip, REVERSE: tl.constexpr, SEGMENTS: tl.constexpr):
    """The (BN, BP) transposed tile of chunk c's stored walk value; with SEGMENTS > 1 corrected by the value
    entering its segment carried through the segment's chunks before it, S + prefix_c S_j, and stored back (chunks
    of the first-walked segment are right as walked: no store)."""
    here, mask = state_tile(row, c, NC, P, N, BP, BN, ip, True, 0)
    ST = tl.load(states_ptr + here, mask=mask, other=0.0)
    if SEGMENTS > 1:
        seg = c // tl.cdiv(NC, SEGMENTS)
        entering, _ = state_tile(row, seg, SEGMENTS, P, N, BP, BN, ip, True, 0)
        ST += tl.load(prefix_ptr + row * NC + c) * tl.load(entering_ptr + entering, mask=mask, other=0.0)
        # a where, not `mask & scalar`: the interpreter refuses a scalar-and-tile mask
        tl.store(states_ptr + here, ST, mask=tl.where(seg != (SEGMENTS - 1 if REVERSE else 0), mask, False))
    return ST


@triton.jit
def _output_kernel(
    x_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, starts_ptr, d_ptr, states_ptr, prefix_ptr, entering_ptr, y_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    HAS_D: tl.constexpr, SEGMENTS: tl.constexpr,
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
    ST = corrected_state(states_ptr, prefix_ptr, entering_ptr, row, c, NC, P, N, BP, BN, ip, False, SEGMENTS)
    xm = load_rows(x_ptr, tokens, valid, P, BP, ip * BP)
    y = tl.dot(scores, xm, input_precision=PRECISION)
    y += (tl.exp(a) * from_state)[:, None] * tl.dot(Cm, ST, input_precision=PRECISION)
    if HAS_D:  # the skip term in float32 before y's one rounding
        y += tl.load(d_ptr + row % H) * xm
    offs_p = ip * BP + tl.arange(0, BP)
    tl.store(y_ptr + tokens[:, None] * P + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_p < P)[None, :])


def precision(dtype: torch.dtype) -> str:
    """float32 inputs in full float32; 16-bit inputs on tf32 matrix units."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(x - 1, 0).bit_length())


def walk_chunks(u, dt, A, v, starts, S_first, L: int, block_p: int, num_warps: int, reverse: bool, segments: int):
    """`_walk_kernel` over u (n, T, H, P), v (n, T, G, N), from S_first (n*H, P, N) float32, in `segments` segments
    (at most the chunk count, none empty: `walk_segments`): the walked value at every chunk (n*H, NC, P, N), the
    true last one (n*H, P, N) and what `corrected_state` reads to correct the former, (prefix (n*H, NC), the values
    entering the segments (n*H, segments, P, N)), or None with one segment (the chunks' values are then right)."""
    n, T, H, P = u.shape
    G, N = v.shape[2], v.shape[3]
    NC = triton.cdiv(T, L)
    block_p = min(block_p, pow2(P))
    f32 = dict(device=u.device, dtype=torch.float32)
    states = torch.empty(n * H, NC, P, N, **f32)
    ends = torch.empty(n * H, segments, P, N, **f32)
    prefix, through = (torch.empty(n * H, NC, **f32), torch.empty(n * H, segments, **f32)) if segments > 1 \
        else (states, states)  # never read with one segment
    grid = (triton.cdiv(P, block_p), n * H)
    launch(_walk_kernel, (*grid, segments),  # dt stands in for absent starts: never read
        u, dt, A, v, dt if starts is None else starts, S_first, states, ends, prefix, through, T, H, G, NC, P, N, L=L,
        BP=block_p, BN=pow2(N), PRECISION=precision(u.dtype), HAS_STARTS=starts is not None, REVERSE=reverse,
        SEGMENTS=segments, num_warps=num_warps)
    if segments == 1:
        return states, ends.reshape(n * H, P, N), None
    S_last = torch.empty(n * H, P, N, **f32)
    launch(_carry_kernel, grid, ends, through, S_last, P, N, BP=block_p, BN=pow2(N), REVERSE=reverse,
           SEGMENTS=segments, num_warps=num_warps)
    return states, S_last, (prefix, ends)


def walk_segments(requested: int | None, rows: int, NC: int) -> int:
    """The segment count of a walk over NC chunks: `requested` (None: `config.default_segments`) capped so that no
    segment is empty (segments of cdiv(NC, requested) chunks)."""
    from .config import default_segments

    wanted = min(default_segments(rows, NC) if requested is None else requested, NC)
    return triton.cdiv(NC, triton.cdiv(NC, wanted))


def ssd_forward(x, dt, A, B, C, D, S0, starts, L: int, cfg):
    """x (n, T, H, P), B, C (n, T, G, N) contiguous, one dtype; dt (n, T, H), A (H,) float32; D (H,) float32 or
    None; S0 (n*H, P, N) float32; starts (n, T) int8 document starts or None; L a power of two; cfg a complete
    LaunchConfig. Returns y (like x, D x included), the final state (n*H, P, N) and the chunk states
    (n*H, NC, P, N) for the backward."""
    n, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, L)
    segments = walk_segments(cfg.segments, n * H, NC)
    states, S_T, correction = walk_chunks(x, dt, A, B, starts, S0, L, cfg.block_p_states, cfg.warps_states,
                                          reverse=False, segments=segments)
    prefix, entering = (states, states) if correction is None else correction  # never read with one segment
    y = torch.empty_like(x)
    block_p = min(cfg.block_p_output, pow2(P))
    launch(_output_kernel, (NC, n * H, triton.cdiv(P, block_p)),  # dt stands in for absent starts and D
        x, dt, A, B, C, dt if starts is None else starts, dt if D is None else D, states, prefix, entering, y,
        T, H, G, NC, P, N, L=L, BP=block_p, BN=pow2(N), PRECISION=precision(x.dtype), HAS_STARTS=starts is not None,
        HAS_D=D is not None, SEGMENTS=segments, num_warps=cfg.warps_output)
    return y, S_T, states
