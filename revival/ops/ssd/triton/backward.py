"""Chunkwise SSD backward in Triton: four kernels (notation of forward.py; a = cumsum(dt A) in the chunk, S the state
entering it, dS' the gradient of the state at its end).

1. forward.py's `_walk_kernel` walking the chunks backwards: stores dS' of each chunk,
   dS <- exp(a_L) dS + (dy exp(a))^T C; what is left is the initial state's gradient. In segments as the forward's
   (`_carry_kernel` joins them; `_dx_kernel` corrects and stores back the dS' it reads).
2. `_dx_kernel`, every (chunk, batch*head, P-tile):
   dx = (B C^T * decay^T * dt) dy + (exp(a_L - a) dt) B dS'^T + D dy, rounded once.
3. `_dc_kernel`, every (N-tile, chunk, batch*group), looping over the group's heads, summing dy x^T and dy S over
   P-tiles:  dC = (dy x^T * decay * dt_s) B + exp(a) dy S, summed over the group's heads in registers
   and its part of dt's gradient: the pairs (t, s) of the scores (+row sum -column sum of d/d(a_t - a_s), and the
   factor dt_s), the entering state +exp(a_t) dy_t . S C_t (= C_t . (dy S)_t). D's gradient per (head, chunk):
   the trace of dy x^T, sum_t dy_t . x_t, stored by the first N-tile's program and summed by torch.
4. `_db_kernel`, the same grid and head loop, summing x dy^T, x dS' and S * dS' over P-tiles:
       dB = (x dy^T * decay^T * dt) C + (exp(a_L - a) dt) x dS'
   and the end state's part of dt's gradient (through dt_s, a_L - a_s and exp(a_L)).
   Each part: da = reverse cumsum of its point terms, ddt += A da, dA += sum dt da (all linear, so parts add).
dB and dC are stored once per group in B's dtype: no (n, T, H, N) float32 per-head buffers (2 x 400 MB at the 125M
shape) and no torch reductions over them. Per N-tile (LaunchConfig.block_n_grads): dB, dC's columns of the tile are
exact; dy x^T / x dy^T (over P) are recomputed by every N-tile's program; C B^T, C_t . (dy S)_t, S * dS' and
B_s . x dS' are sums over N, so each program stores its tile's part of ddt and dA per head in float32 scratch
(kernel, ..., N-tile), summed by torch afterwards (deterministic, no atomics). Why N-tiles: whole-N programs held
(L, N) accumulators at 250 registers x 8 warps. The head loop costs registers (sm_90, P 64, N 128, (P 16, N 32)
tiles, 8 warps: dc 112 -> 214, db 104 -> 185, no spills, 2 -> 1 programs per SM), paid for by G x fewer programs.
Why not one gradient kernel: it held 3 (L, L) and 2 (L, N) float32 accumulators and B, C over its P loop and spilled
~2 KB per thread on sm_90 at P 64, N 128 (benchmarks/results/ssd_compile_before.json, _after.json).
Every transposed operand is computed from operands loaded transposed from memory (x dy^T beside dy x^T, B C^T beside
C B^T), never `tl.trans` of a computed tile (fla #640).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import (
    _output_kernel,
    _walk_kernel,
    chunk_tokens,
    corrected_state,
    decay_matrix,
    document_masks,
    launch,
    load_cols,
    load_decay,
    load_rows,
    pow2,
    precision,
    state_tile,
    walk_chunks,
    walk_segments,
)


@triton.jit
def _decay_T(a, same, L: tl.constexpr):
    """exp(a_t - a_s) at [s, t] for s <= t within one document, else 0: the transposed decay, built directly."""
    offs = tl.arange(0, L)
    return tl.exp(tl.where((offs[None, :] >= offs[:, None]) & same, a[None, :] - a[:, None], float("-inf")))


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 x in `dtype`, to nearest even for bfloat16 also under the interpreter (whose cast truncates)."""
    if dtype == tl.bfloat16:  # zero the low 16 bits after adding half an ulp (ties to even): exact in bfloat16
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dx_kernel(
    dt_ptr, A_ptr, b_ptr, c_ptr, starts_ptr, d_ptr, dstates_ptr, prefix_ptr, entering_ptr, dy_ptr, dx_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    HAS_D: tl.constexpr, SEGMENTS: tl.constexpr,
):
    c = tl.program_id(0)
    row = tl.program_id(1)
    ip = tl.program_id(2)
    tokens, group_tokens, valid = chunk_tokens(row, c, T, H, G, L)
    dt, a, a_total = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
    same, _, to_end_mask, _ = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    Bm = load_rows(b_ptr, group_tokens, valid, N, BN, 0)
    scores_T = tl.dot(Bm, load_cols(c_ptr, group_tokens, valid, N, BN, 0), input_precision=PRECISION)  # [s, t]
    scores_T *= _decay_T(a, same, L) * dt[:, None]
    dym = load_rows(dy_ptr, tokens, valid, P, BP, ip * BP)
    dx = tl.dot(scores_T, dym, input_precision=PRECISION)
    dS_T = corrected_state(dstates_ptr, prefix_ptr, entering_ptr, row, c, NC, P, N, BP, BN, ip, True, SEGMENTS)
    to_end = tl.exp(a_total - a) * dt * to_end_mask
    dx += to_end[:, None] * tl.dot(Bm, dS_T, input_precision=PRECISION)
    if HAS_D:  # the skip term's gradient in float32 before dx's one rounding
        dx += tl.load(d_ptr + row % H) * dym
    offs_p = ip * BP + tl.arange(0, BP)
    tl.store(dx_ptr + tokens[:, None] * P + offs_p[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_p < P)[None, :])


@triton.jit
def _dc_kernel(
    x_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, starts_ptr, states_ptr, dy_ptr,
    ddt_ptr, dc_ptr, da_ptr, dd_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    HAS_DD: tl.constexpr,
):
    i_n = tl.program_id(0)  # fastest: a chunk's N-tiles run together and share x, dy, B, C through L2
    c = tl.program_id(1)
    b = tl.program_id(2) // G
    g = tl.program_id(2) % G
    heads = H // G
    n_tiles = tl.num_programs(0)
    _first, group_tokens, valid = chunk_tokens(b * H + g * heads, c, T, H, G, L)
    same, from_state, _to_end, _keeps = document_masks(starts_ptr, b, c, T, L, HAS_STARTS)
    # the group's C, B and C B^T over this N-tile serve every head of the group
    Cm = load_rows(c_ptr, group_tokens, valid, N, BN, i_n * BN)
    CB = tl.dot(Cm, load_cols(b_ptr, group_tokens, valid, N, BN, i_n * BN), input_precision=PRECISION)
    dC = tl.zeros((L, BN), tl.float32)  # the group's: summed over its heads here, stored once
    for j in range(0, heads):
        row = b * H + g * heads + j
        tokens = chunk_tokens(row, c, T, H, G, L)[0]
        dy_x = tl.zeros((L, L), tl.float32)  # [t, s] = dy_t . x_s, the same in every N-tile's program
        dy_S = tl.zeros((L, BN), tl.float32)
        for start in range(0, P, BP):
            dy = load_rows(dy_ptr, tokens, valid, P, BP, start)
            dy_x += tl.dot(dy, load_cols(x_ptr, tokens, valid, P, BP, start), input_precision=PRECISION)
            here, mask = state_tile(row, c, NC, P, N, BP, BN, start // BP, False, i_n)
            dy_S += tl.dot(dy, tl.load(states_ptr + here, mask=mask, other=0.0), input_precision=PRECISION)
        if HAS_DD:  # D's gradient, sum_t dy_t . x_t: dy x^T's trace (exact products, float32 sums as before)
            diagonal = tl.arange(0, L)[:, None] == tl.arange(0, L)[None, :]
            tl.store(dd_ptr + row.to(tl.int64) * NC + c, tl.sum(tl.sum(tl.where(diagonal, dy_x, 0.0), 1), 0),
                     mask=i_n == 0)

        dt, a, _ = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
        decayed = decay_matrix(a, same, L) * dy_x  # [t, s]
        from_start = tl.exp(a) * from_state
        dy_y_state = tl.sum(Cm * dy_S, 1)  # this N-tile's part of dy_t . (the entering state's part of y_t)
        pairs = decayed * CB  # d(loss)/d(dt_s) of the scores over this N-tile, per (t, s)
        ddt = tl.sum(pairs, 0)
        pairs *= dt[None, :]  # now d(loss)/d(a_t - a_s)
        da = tl.cumsum(from_start * dy_y_state + tl.sum(pairs, 1) - tl.sum(pairs, 0), 0, reverse=True)
        ddt += tl.load(A_ptr + row % H) * da
        tl.store(da_ptr + (row.to(tl.int64) * NC + c) * n_tiles + i_n, tl.sum(dt * da, 0))
        tl.store(ddt_ptr + tokens * n_tiles + i_n, ddt, mask=valid)
        # B reloaded per head (an L1 / L2 hit): one tile fewer held across the head loop
        Bm = load_rows(b_ptr, group_tokens, valid, N, BN, i_n * BN)
        dC += tl.dot(decayed * dt[None, :], Bm, input_precision=PRECISION) + from_start[:, None] * dy_S
    offs_n = i_n * BN + tl.arange(0, BN)
    tl.store(dc_ptr + group_tokens[:, None] * N + offs_n[None, :], round_to(dC, dc_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n < N)[None, :])


@triton.jit
def _db_kernel(
    x_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, starts_ptr, states_ptr, dstates_ptr, dy_ptr,
    ddt_ptr, db_ptr, da_ptr,
    T, H, G, NC, P, N,
    L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    i_n = tl.program_id(0)  # fastest: a chunk's N-tiles run together and share x, dy, B, C through L2
    c = tl.program_id(1)
    b = tl.program_id(2) // G
    g = tl.program_id(2) % G
    heads = H // G
    n_tiles = tl.num_programs(0)
    _first, group_tokens, valid = chunk_tokens(b * H + g * heads, c, T, H, G, L)
    same, _from_state, to_end_mask, keeps = document_masks(starts_ptr, b, c, T, L, HAS_STARTS)
    offs = tl.arange(0, L)
    Cm = load_rows(c_ptr, group_tokens, valid, N, BN, i_n * BN)  # the group's, for every head of it
    dB = tl.zeros((L, BN), tl.float32)  # the group's: summed over its heads here, stored once
    for j in range(0, heads):
        row = b * H + g * heads + j
        tokens = chunk_tokens(row, c, T, H, G, L)[0]
        x_dy = tl.zeros((L, L), tl.float32)  # [s, t] = x_s . dy_t, the same in every N-tile's program
        x_dS = tl.zeros((L, BN), tl.float32)  # x dS'
        S_dS = tl.zeros((BN,), tl.float32)  # column sums of S * dS'
        for start in range(0, P, BP):
            x = load_rows(x_ptr, tokens, valid, P, BP, start)
            x_dy += tl.dot(x, load_cols(dy_ptr, tokens, valid, P, BP, start), input_precision=PRECISION)
            here, mask = state_tile(row, c, NC, P, N, BP, BN, start // BP, False, i_n)
            dS_end = tl.load(dstates_ptr + here, mask=mask, other=0.0)
            x_dS += tl.dot(x, dS_end, input_precision=PRECISION)
            S_dS += tl.sum(tl.load(states_ptr + here, mask=mask, other=0.0) * dS_end, 0)

        dt, a, a_total = load_decay(dt_ptr, A_ptr, row, H, tokens, valid)
        to_end = tl.exp(a_total - a) * dt * to_end_mask
        dB += tl.dot(_decay_T(a, same, L) * x_dy * dt[:, None], Cm, input_precision=PRECISION) \
            + to_end[:, None] * x_dS
        # this N-tile's part of dt's gradient through the end state (linear in r and S_dS: the tiles' parts add)
        r = tl.sum(load_rows(b_ptr, group_tokens, valid, N, BN, i_n * BN) * x_dS, 1)  # x_s . dS' B_s, the N-tile
        da_total = tl.exp(a_total) * keeps * tl.sum(S_dS, 0) + tl.sum(to_end * r, 0)
        da = tl.cumsum(tl.where(offs == L - 1, da_total, 0.0) - to_end * r, 0, reverse=True)
        ddt = tl.exp(a_total - a) * to_end_mask * r + tl.load(A_ptr + row % H) * da
        tl.store(da_ptr + (row.to(tl.int64) * NC + c) * n_tiles + i_n, tl.sum(dt * da, 0))
        tl.store(ddt_ptr + tokens * n_tiles + i_n, ddt, mask=valid)
    offs_n = i_n * BN + tl.arange(0, BN)
    tl.store(db_ptr + group_tokens[:, None] * N + offs_n[None, :], round_to(dB, db_ptr.dtype.element_ty),
             mask=valid[:, None] & (offs_n < N)[None, :])


def training_kernels(cfg):
    """(name, kernel, constexprs besides the shapes', P-tile, num_warps) of each kernel a training step launches
    under the complete LaunchConfig `cfg` (benchmarks/ssd_compile_probe.py compiles them)."""
    one = dict(SEGMENTS=1)  # the 2k shape's walks (`config.default_segments`), with the skip term D (mamba2)
    return [("walk", _walk_kernel, dict(one, REVERSE=False), cfg.block_p_states, cfg.warps_states),
            ("output", _output_kernel, dict(one, HAS_D=True), cfg.block_p_output, cfg.warps_output),
            ("dstates", _walk_kernel, dict(one, REVERSE=True), cfg.block_p_dstates, cfg.warps_dstates),
            ("dx", _dx_kernel, dict(one, HAS_D=True), cfg.block_p_dx, cfg.warps_dx),
            ("dc", _dc_kernel, dict(BN=cfg.block_n_grads, HAS_DD=True), cfg.block_p_grads, cfg.warps_grads),
            ("db", _db_kernel, dict(BN=cfg.block_n_grads), cfg.block_p_grads, cfg.warps_grads)]


def ssd_backward(x, dt, A, B, C, D, starts, states, dy, dS_T, L: int, cfg, wants_dD: bool):
    """Gradients of ssd_forward's (y, final state) with respect to x, dt, A, B, C, the initial state and (D given
    and `wants_dD`, else None) D, in float32."""
    n, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    NC = triton.cdiv(T, L)
    BN = pow2(N)
    f32 = dict(device=x.device, dtype=torch.float32)
    segments = walk_segments(cfg.segments, n * H, NC)
    dstates, dS0, correction = walk_chunks(dy, dt, A, C, starts, dS_T, L, cfg.block_p_dstates, cfg.warps_dstates,
                                           reverse=True, segments=segments)
    prefix, entering = (dstates, dstates) if correction is None else correction  # never read with one segment
    shapes = dict(L=L, BN=BN, PRECISION=precision(x.dtype), HAS_STARTS=starts is not None)
    starts = dt if starts is None else starts  # any tensor when HAS_STARTS is off: never read
    sizes = (T, H, G, NC, P, N)
    dx = torch.empty_like(x)
    block_p = min(cfg.block_p_dx, pow2(P))
    launch(_dx_kernel, (NC, n * H, triton.cdiv(P, block_p)), dt, A, B, C, starts, dt if D is None else D, dstates,
           prefix, entering, dy, dx, *sizes, BP=block_p, HAS_D=D is not None, SEGMENTS=segments,
           num_warps=cfg.warps_dx, **shapes)
    # dt's and A's gradients: one part per (kernel, N-tile), summed here (deterministic, no atomics)
    block_n = min(cfg.block_n_grads, BN)
    n_tiles = triton.cdiv(N, block_n)
    ddt_parts = torch.empty(2, n, T, H, n_tiles, **f32)
    dA_parts = torch.empty(2, n * H, NC, n_tiles, **f32)
    dD_parts = torch.empty(n, H, NC, **f32) if wants_dD else dA_parts  # never written without
    dB, dC = torch.empty_like(B), torch.empty_like(C)  # per group, in B's dtype: each program sums its heads
    grads = dict(shapes, BN=block_n, BP=min(cfg.block_p_grads, pow2(P)), num_warps=cfg.warps_grads)
    launch(_dc_kernel, (n_tiles, NC, n * G), x, dt, A, B, C, starts, states, dy, ddt_parts[0], dC,
           dA_parts[0], dD_parts, *sizes, HAS_DD=wants_dD, **grads)
    launch(_db_kernel, (n_tiles, NC, n * G), x, dt, A, B, C, starts, states, dstates, dy, ddt_parts[1], dB,
           dA_parts[1], *sizes, **grads)
    ddt = ddt_parts.sum((0, 4))
    dA = dA_parts.reshape(2, n, H, NC, n_tiles).sum((0, 1, 3, 4))
    dD = dD_parts.sum((0, 2)) if wants_dD else None
    return dx, ddt, dA, dB, dC, dS0, dD
