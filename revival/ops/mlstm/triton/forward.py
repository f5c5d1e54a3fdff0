"""Chunkwise mLSTM forward in Triton: two kernels (docs/math.md, "Chunkwise form").

1. `_states_kernel` walks the chunks of one (batch*head, Dk-tile, Dv-tile) in order and stores the state *entering*
   each chunk (C: Dk x Dv, n: Dk, m: scalar), plus the final state. One small matrix product per chunk. With few
   batch*head rows the same states come from the chunk-parallel form instead (`_stabilizer_kernel`,
   `_chunk_update_kernel`, `_chunk_scan_kernel`; `use_chunk_scan` decides).
2. `_output_kernel` runs every (chunk, batch*head, Dv-tile) in parallel: the intra-chunk quadratic part plus the
   contribution of the state entering the chunk, normalized.

Stabilizer: exactly the one of `reference.py` / `chunkwise.py` (m_t = max(F_t + m_0, max_s(F_t - F_s + i_s))), so the
Triton kernels agree with the references to rounding. A sequence whose length is not a multiple of the chunk is
handled exactly: positions past T get log-forget 0 and input gate -inf (they contribute nothing, no padding).

Layout: q, k (B, H, T, Dk), v (B, H, T, Dv) with contiguous last dims and any strides otherwise (`_token_offsets`:
head-major, or token-major views of a projection's output); i, f (BH, T) contiguous; states float32 (BH, ...).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._triton import linear_recurrence_combine
from .config import PRESETS, LaunchConfig, _pow2


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Matrix product; UPCAST (interpreter only: its bf16 products are wrong) multiplies in float32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, DT: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(DT). Under the interpreter (UPCAST) a plain float32 -> bfloat16 cast truncates, which biases every rounding
    the same way; the GPU rounds to nearest even, so the interpreter is asked to do the same."""
    y = x.to(DT)
    if UPCAST:
        if x.dtype == tl.float32 and DT == tl.bfloat16:  # round to nearest even by hand: bf16 = float32's high half
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(DT, bitcast=True)
    return y


@triton.jit
def _split(x, LOW: tl.constexpr, UPCAST: tl.constexpr):
    hi = _cast(x, LOW, UPCAST)
    return hi, _cast(x - hi.to(tl.float32), LOW, UPCAST)


@triton.jit
def _mm(a, b, SA: tl.constexpr, SB: tl.constexpr, LOW: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b where a (SA) and/or b (SB) are computed float32 tiles and the others inputs in LOW. With SPLIT (nonzero:
    callers pass their bit of the SPLITS mask) each computed operand is x_hi + x_lo in LOW (about 16 bits of mantissa
    from 16-bit matrix units); else x.to(LOW)."""
    if SPLIT:
        if SA:
            a_hi, a_lo = _split(a, LOW, UPCAST)
        else:
            a_hi = _cast(a, LOW, UPCAST)
        if SB:
            b_hi, b_lo = _split(b, LOW, UPCAST)
        else:
            b_hi = _cast(b, LOW, UPCAST)
        acc = _dot(a_hi, b_hi, PRECISION, UPCAST)
        if SA:
            acc += _dot(a_lo, b_hi, PRECISION, UPCAST)
        if SB:
            acc += _dot(a_hi, b_lo, PRECISION, UPCAST)
        return acc
    else:
        return _dot(_cast(a, LOW, UPCAST), _cast(b, LOW, UPCAST), PRECISION, UPCAST)


@triton.jit
def _chunk_gates(i_ptr, f_ptr, row, t0, T, L: tl.constexpr):
    """Local cumulative log-forget b (L), chunk total g, input gates (-inf past T) and the validity mask."""
    offs_t = t0 + tl.arange(0, L)
    valid = offs_t < T
    f = tl.load(f_ptr + row * T + offs_t, mask=valid, other=0.0).to(tl.float32)
    ig = tl.load(i_ptr + row * T + offs_t, mask=valid, other=0.0).to(tl.float32)
    log_f = tl.where(valid, _log_sigmoid(f), 0.0)
    b = tl.cumsum(log_f, 0)
    g = tl.sum(log_f, 0)
    ig = tl.where(valid, ig, float("-inf"))
    return b, g, ig, valid


@triton.jit
def _token_offsets(row, t, H, s_b, s_h, s_t):
    """Element offsets of the tokens t of batch*head `row` (= b * H + h) in a (B, H, T, D) tensor with strides
    (s_b, s_h, s_t, 1): head-major (B, H, T, D) storage or token-major (B, T, H, D), e.g. a projection's output."""
    return (row // H) * s_b + (row % H) * s_h + t.to(tl.int64) * s_t


@triton.jit
def _state_tile(DK, DV, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, pid_kv, row):
    """The (BK, BV) state tile `pid_kv` (of Dk-tiles x Dv-tiles) of batch-head `row`. Returns the row, the tile
    indices, the offsets and masks, and the tile's offsets in a (BH, DK, DV) state."""
    row = row.to(tl.int64)
    ik = pid_kv // NV
    iv = pid_kv % NV
    offs_k, offs_v, mask_k, mask_v, mask_kv, state_off = _kv_tile(row, ik * BK, iv * BV, DK, DV, BK, BV)
    return row, ik, iv, offs_k, offs_v, mask_k, mask_v, mask_kv, state_off


@triton.jit
def _kv_tile(row, k0, v0, DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """Offsets and masks of the (BK, BV) tile at (k0, v0) of batch-head `row`'s (DK, DV) state (row: int64)."""
    offs_k = k0 + tl.arange(0, BK)
    offs_v = v0 + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    return offs_k, offs_v, mask_k, mask_v, mask_kv, row * DK * DV + offs_k[:, None] * DV + offs_v[None, :]


@triton.jit
def _states_kernel(
    k_ptr, v_ptr, i_ptr, f_ptr,
    c0_ptr, n0_ptr, m0_ptr,
    cs_ptr, ns_ptr, ms_ptr,
    c_out_ptr, n_out_ptr,
    T, NC, DK, DV, H, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    row, ik, iv, offs_k, offs_v, mask_k, mask_v, mask_kv, state_off = _state_tile(
        DK, DV, BK, BV, NV, tl.program_id(0), tl.program_id(1))
    offs_l = tl.arange(0, L)

    C = tl.load(c0_ptr + state_off, mask=mask_kv, other=0.0)
    n = tl.load(n0_ptr + row * DK + offs_k, mask=mask_k, other=0.0)
    m = tl.load(m0_ptr + row)
    for c in range(0, NC):
        chunk_state = (row * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        tl.store(cs_ptr + chunk_state, _cast(C, cs_ptr.dtype.element_ty, UPCAST), mask=mask_kv)
        if iv == 0:
            tl.store(ns_ptr + (row * NC + c) * DK + offs_k, n, mask=mask_k)
            if ik == 0:
                tl.store(ms_ptr + row * (NC + 1) + c, m)
        t0 = c * L
        b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
        a = g - b + ig
        m_new = tl.maximum(g + m, tl.max(a, 0))
        w = tl.exp(a - m_new)
        decay = tl.exp(g + m - m_new)
        k_rows = _token_offsets(row, t0 + offs_l, H, k_sb, k_sh, k_st)
        v_rows = _token_offsets(row, t0 + offs_l, H, v_sb, v_sh, v_st)
        k = tl.load(k_ptr + k_rows[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
        kw = k.to(tl.float32) * w[:, None]
        C = decay * C + _mm(tl.trans(kw), v, True, False, MIX, PRECISION, UPCAST, SPLITS & 1)
        n = decay * n + tl.sum(kw, 0)
        m = m_new
    tl.store(c_out_ptr + state_off, C, mask=mask_kv)
    if iv == 0:
        tl.store(n_out_ptr + row * DK + offs_k, n, mask=mask_k)
        if ik == 0:
            tl.store(ms_ptr + row * (NC + 1) + NC, m)


# ---- the chunk-parallel form of the state recurrence (for few batch*head rows; see `chunk_states`) ----------------
# C after chunk c = decay_c * C after chunk c-1 + U_c, where U_c = (w k)^T v is chunk c's own term. With few rows the
# sequential kernel above has too few programs to fill the GPU and each waits on one small matrix product per chunk.
# Here the stabilizer comes first (one scalar scan per row), then every U_c in parallel, then an elementwise scan over
# the chunks, many programs per row, G chunks per step: the same sums in another order.


@triton.jit
def _max_plus(g1, a1, g2, a2):
    """Compose m -> max(m + g1, a1) with m -> max(m + g2, a2) (the stabilizer's update over two chunks)."""
    return g1 + g2, tl.maximum(a1 + g2, a2)


@triton.jit
def _stabilizer_kernel(i_ptr, f_ptr, m0_ptr, ms_ptr, T, NC, L: tl.constexpr, BC: tl.constexpr):
    """One batch*head row: ms[c + 1] = max(ms[c] + g_c, max_t(g_c - b_t + i_t)) for every chunk c, ms[0] = m0
    (the sequential kernel's stabilizer), BC chunks per step by an associative scan."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m0_ptr + row)
    tl.store(ms_ptr + row * (NC + 1), m)
    offs_c = tl.arange(0, BC)
    offs_l = tl.arange(0, L)
    for c0 in range(0, NC, BC):
        chunks = c0 + offs_c
        t = chunks[:, None] * L + offs_l[None, :]
        valid = t < T
        f = tl.load(f_ptr + row * T + t, mask=valid, other=0.0).to(tl.float32)
        ig = tl.load(i_ptr + row * T + t, mask=valid, other=0.0).to(tl.float32)
        log_f = tl.where(valid, _log_sigmoid(f), 0.0)
        b = tl.cumsum(log_f, 1)
        g = tl.sum(log_f, 1)
        a = tl.where(valid, g[:, None] - b + ig, float("-inf"))
        g_run, a_run = tl.associative_scan((g, tl.max(a, 1)), 0, _max_plus)
        m_after = tl.maximum(m + g_run, a_run)  # chunks past NC (g = 0, a = -inf) carry m unchanged
        tl.store(ms_ptr + row * (NC + 1) + 1 + chunks, m_after, mask=chunks < NC)
        m = tl.max(tl.where(offs_c == BC - 1, m_after, float("-inf")), 0)


@triton.jit
def _chunk_update_kernel(
    k_ptr, v_ptr, i_ptr, f_ptr, ms_ptr,
    cs_ptr, ns_ptr, c_out_ptr, n_out_ptr, decay_ptr,
    T, NC, DK, DV, H, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    """One (chunk, state tile, batch*head): chunk c's own term U_c = (w k)^T v, sum(w k), with the key weights w at
    the stabilizer after the chunk, stored where the state after the chunk goes (slot c + 1, or the final state for
    the last chunk), and the chunk's decay exp(g + m_before - m_after)."""
    c = tl.program_id(0)
    row, ik, iv, offs_k, offs_v, mask_k, mask_v, mask_kv, state_off = _state_tile(
        DK, DV, BK, BV, NV, tl.program_id(1), tl.program_id(2))
    t0 = c * L
    b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
    m_before = tl.load(ms_ptr + row * (NC + 1) + c)
    m_after = tl.load(ms_ptr + row * (NC + 1) + c + 1)
    w = tl.exp(g - b + ig - m_after)
    k_rows = _token_offsets(row, t0 + tl.arange(0, L), H, k_sb, k_sh, k_st)
    v_rows = _token_offsets(row, t0 + tl.arange(0, L), H, v_sb, v_sh, v_st)
    k = tl.load(k_ptr + k_rows[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
    v = tl.load(v_ptr + v_rows[:, None] + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
    kw = k.to(tl.float32) * w[:, None]
    update = _mm(tl.trans(kw), v, True, False, MIX, PRECISION, UPCAST, SPLITS & 1)
    n_update = tl.sum(kw, 0)
    if c == NC - 1:
        tl.store(c_out_ptr + state_off, update, mask=mask_kv)
        if iv == 0:
            tl.store(n_out_ptr + row * DK + offs_k, n_update, mask=mask_k)
    else:
        slot = (row * NC + c + 1) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        tl.store(cs_ptr + slot, _cast(update, cs_ptr.dtype.element_ty, UPCAST), mask=mask_kv)
        if iv == 0:
            tl.store(ns_ptr + (row * NC + c + 1) * DK + offs_k, n_update, mask=mask_k)
    if (ik == 0) & (iv == 0):
        tl.store(decay_ptr + row * NC + c, tl.exp(g + m_before - m_after))


@triton.jit
def _chunk_scan_kernel(buf_ptr, init_ptr, edge_ptr, decay_ptr, NC, E,
                       REVERSE: tl.constexpr, G: tl.constexpr, BE: tl.constexpr, UPCAST: tl.constexpr):
    """In place, for BE of the E elements of one batch*head row: S = init; over the chunks c in order (REVERSE: from
    the last), S = decay_c * S + U_c, where U_c sits in the slot that S then takes, which is c + 1 (REVERSE: c - 1)
    of buf (BH, NC, E), or edge (BH, E) past the ends; the first slot (0, REVERSE: NC - 1) takes init.
    G chunks per step: their U are loaded at once and combined by an associative scan."""
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs = pid * BE + tl.arange(0, BE)
    mask = offs < E
    S = tl.load(init_ptr + row * E + offs, mask=mask, other=0.0).to(tl.float32)
    first = NC - 1 if REVERSE else 0
    tl.store(buf_ptr + (row * NC + first) * E + offs, _cast(S, buf_ptr.dtype.element_ty, UPCAST), mask=mask)
    offs_g = tl.arange(0, G)
    for step0 in range(0, NC, G):
        step = step0 + offs_g
        inside = step < NC
        chunk = NC - 1 - step if REVERSE else step
        slot = chunk - 1 if REVERSE else chunk + 1
        decay = tl.load(decay_ptr + row * NC + chunk, mask=inside, other=1.0)
        in_buf = (inside & (slot >= 0) & (slot < NC))[:, None] & mask[None, :]
        at_edge = (inside & ((slot < 0) | (slot >= NC)))[:, None] & mask[None, :]
        buf_off = (row * NC + slot)[:, None] * E + offs[None, :]
        edge_off = row * E + offs[None, :] + 0 * slot[:, None]
        update = tl.load(buf_ptr + buf_off, mask=in_buf, other=0.0).to(tl.float32)
        update += tl.load(edge_ptr + edge_off, mask=at_edge, other=0.0)
        decays = tl.broadcast_to(decay[:, None], (G, BE))
        scale, offset = tl.associative_scan((decays, update), 0, linear_recurrence_combine)
        S_all = scale * S[None, :] + offset
        tl.store(buf_ptr + buf_off, _cast(S_all, buf_ptr.dtype.element_ty, UPCAST), mask=in_buf)
        tl.store(edge_ptr + edge_off, S_all, mask=at_edge)
        S = tl.sum(tl.where((offs_g == G - 1)[:, None], S_all, 0.0), 0)


@triton.jit
def _output_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr,
    cs_ptr, ns_ptr, ms_ptr,
    h_ptr, mq_ptr, den_ptr,
    T, NC, DK, DV, scale, eps,
    H, q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, h_sb, h_sh, h_st,
    L: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, NVI: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    """One (chunk, batch*head, span of NVI Dv-tiles of width BV): scores once, then the Dv-tiles in a loop."""
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    t0 = c * L
    offs_l = tl.arange(0, L)
    offs_k = tl.arange(0, BKF)
    mask_k = offs_k < DK

    b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
    rows = row * T + t0 + offs_l
    q_rows = _token_offsets(row, t0 + offs_l, H, q_sb, q_sh, q_st)
    k_rows = _token_offsets(row, t0 + offs_l, H, k_sb, k_sh, k_st)
    v_rows = _token_offsets(row, t0 + offs_l, H, v_sb, v_sh, v_st)
    h_rows = _token_offsets(row, t0 + offs_l, H, h_sb, h_sh, h_st)
    q = tl.load(q_ptr + q_rows[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
    k = tl.load(k_ptr + k_rows[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
    n = tl.load(ns_ptr + (row * NC + c) * DK + offs_k, mask=mask_k, other=0.0)
    m_prev = tl.load(ms_ptr + row * (NC + 1) + c)

    causal = offs_l[:, None] >= offs_l[None, :]
    log_d = tl.where(causal, b[:, None] - b[None, :] + ig[None, :], float("-inf"))
    log_state = b + m_prev
    m_query = tl.maximum(log_state, tl.max(log_d, 1))
    decay = tl.exp(log_d - m_query[:, None])
    scores = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale * decay
    # the entering state's weight scales rows: (w q) @ C = w * (q @ C), so q enters the product unrounded
    w_state = scale * tl.exp(log_state - m_query)
    den = tl.sum(scores, 1) + w_state * tl.sum(q.to(tl.float32) * n[None, :], 1)
    z = tl.maximum(tl.abs(den), tl.exp(-m_query)) + eps
    out_scale = 1.0 / z
    for j in range(0, NVI):
        offs_v = (iv * NVI + j) * BV + tl.arange(0, BV)
        mask_v = offs_v < DV
        v = tl.load(v_ptr + v_rows[:, None] + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
        chunk_state = (row * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        C = tl.load(cs_ptr + chunk_state, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        num = _mm(scores, v, True, False, MIX, PRECISION, UPCAST, SPLITS & 2)
        num += w_state[:, None] * _mm(q, C, False, True, MIX, PRECISION, UPCAST, SPLITS & 4)
        h = num * out_scale[:, None]
        tl.store(h_ptr + h_rows[:, None] + offs_v[None, :], _cast(h, h_ptr.dtype.element_ty, UPCAST),
                 mask=valid[:, None] & mask_v[None, :])
    if iv == 0:
        tl.store(mq_ptr + rows, m_query, mask=valid)
        tl.store(den_ptr + rows, den, mask=valid)


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _split_mask(dtype: torch.dtype, mode: str) -> int:
    """The products split into hi + lo parts under the precision preset `mode` (config.PRESETS)."""
    return 0 if dtype == torch.float32 else PRESETS[mode][0]


def _state_fp32(dtype: torch.dtype, mode: str) -> bool:
    return dtype == torch.float32 or PRESETS[mode][1]


def _mix(dtype: torch.dtype):
    return getattr(tl, str(dtype).split(".")[-1])


# The tile size that fits the chip's shared memory, per kernel, shape class and candidate sizes: a cache of what the
# hardware allows (at most one failed compile per size, on the first call), never set by callers.
_FITTING_TILE: dict = {}


def launch_with_fallback(key, sizes, launch) -> None:
    """Launch with the first tile size in `sizes` whose kernel fits the chip's shared memory."""
    from triton.runtime.errors import OutOfResources

    key = (*key, tuple(sizes))
    start = sizes.index(_FITTING_TILE[key]) if key in _FITTING_TILE else 0
    for index in range(start, len(sizes)):
        try:
            launch(sizes[index])
        except OutOfResources:
            if index == len(sizes) - 1:
                raise
            continue
        _FITTING_TILE[key] = sizes[index]
        return


def _halvings(size: int, floor: int = 16) -> list[int]:
    out = [size]
    while out[-1] > floor:
        out.append(out[-1] // 2)
    return out


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def token_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(s_b, s_h, s_t) of a (B, H, T, D) tensor whose last dim is contiguous (the kernels' `_token_offsets`)."""
    if x.stride(-1) != 1:
        raise ValueError(f"expected a contiguous last dim, got strides {x.stride()}")
    return x.stride(0), x.stride(1), x.stride(2)


def empty_like_layout(x: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty (B, H, T, D) tensor stored like x: token-major (B, T, H, D) when x's heads are closer in memory than
    its time steps (a projection's output viewed per head), else head-major."""
    B, H, T, _ = x.shape
    if H > 1 and T > 1 and x.stride(1) < x.stride(2):
        return torch.empty(B, T, H, D, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(B, H, T, D, device=x.device, dtype=dtype)


def chunk_states(k, v, i, f, C0, n0, m0, chunk_size: int, cfg: LaunchConfig, mode: str):
    """The state entering every chunk: Cs (BH, NC, Dk, Dv) (float32, or k's dtype when the preset `mode` says so),
    ns (BH, NC, Dk), ms (BH, NC + 1) (ms[:, NC] is the final m), and the final C (BH, Dk, Dv), n (BH, Dk) in float32.
    k, v are (B, H, T, D) with contiguous last dims (any layout, `token_strides`). The backward calls it again when the
    forward did not keep the chunk states (deterministic: the same values)."""
    B, H, T, Dk = k.shape
    BH = B * H
    Dv = v.shape[-1]
    strides = (H, *token_strides(k), *token_strides(v))
    L = chunk_size
    NC = triton.cdiv(T, L)
    dev = k.device
    state_dtype = torch.float32 if _state_fp32(k.dtype, mode) else k.dtype
    cs = torch.empty(BH, NC, Dk, Dv, device=dev, dtype=state_dtype)
    ns = torch.empty(BH, NC, Dk, device=dev, dtype=torch.float32)
    ms = torch.empty(BH, NC + 1, device=dev, dtype=torch.float32)
    C_out = torch.empty(BH, Dk, Dv, device=dev, dtype=torch.float32)
    n_out = torch.empty(BH, Dk, device=dev, dtype=torch.float32)
    splits = _split_mask(k.dtype, mode)
    flags = dict(PRECISION=_precision(k.dtype), UPCAST=_upcast(k.dtype), MIX=_mix(k.dtype), SPLITS=splits)
    shape_class = (Dk, Dv, L, k.dtype, splits, state_dtype, cfg)

    def states(BV):
        NK, NV = triton.cdiv(Dk, cfg.block_k), triton.cdiv(Dv, BV)
        _states_kernel[(NK * NV, BH)](
            k, v, i, f, C0, n0, m0, cs, ns, ms, C_out, n_out, T, NC, Dk, Dv, *strides,
            L=L, BK=cfg.block_k, BV=BV, NV=NV, num_warps=cfg.warps_states, **flags,
        )

    if use_chunk_scan(BH, Dk, Dv, NC, cfg):
        decay = torch.empty(BH, NC, device=dev, dtype=torch.float32)
        _stabilizer_kernel[(BH,)](i, f, m0, ms, T, NC, L=L, BC=cfg.stabilizer_chunks, num_warps=4)

        def updates(BV):
            NK, NV = triton.cdiv(Dk, cfg.block_k), triton.cdiv(Dv, BV)
            _chunk_update_kernel[(NC, NK * NV, BH)](
                k, v, i, f, ms, cs, ns, C_out, n_out, decay, T, NC, Dk, Dv, *strides,
                L=L, BK=cfg.block_k, BV=BV, NV=NV, num_warps=4, **flags,
            )

        launch_with_fallback(("updates", *shape_class), _halvings(cfg.block_v), updates)
        chunk_scan(cs, C0, C_out, decay, cfg, reverse=False)
        chunk_scan(ns, n0, n_out, decay, cfg, reverse=False)
    else:
        launch_with_fallback(("states", *shape_class), _halvings(cfg.block_v), states)
    return cs, ns, ms, C_out, n_out


def use_chunk_scan(BH: int, Dk: int, Dv: int, NC: int, cfg: LaunchConfig) -> bool:
    """The chunk-parallel state recurrence when the sequential kernel would have fewer than `cfg.seq_min_programs`
    programs (0 never uses it, a huge value always does) and there are at least two chunks."""
    programs = BH * triton.cdiv(Dk, cfg.block_k) * triton.cdiv(Dv, cfg.block_v)
    return NC > 1 and programs < cfg.seq_min_programs


def chunk_scan(buf: torch.Tensor, init: torch.Tensor, edge: torch.Tensor, decay: torch.Tensor, cfg: LaunchConfig,
               reverse: bool) -> None:
    """`_chunk_scan_kernel` over buf (BH, NC, ...) with init and edge (BH, ...) float32 and decay (BH, NC)."""
    BH, NC = buf.shape[:2]
    E = buf[0, 0].numel()
    _chunk_scan_kernel[(triton.cdiv(E, cfg.scan_elements), BH)](
        buf, init, edge, decay, NC, E, REVERSE=reverse, G=cfg.scan_chunks, BE=cfg.scan_elements,
        UPCAST=_upcast(buf.dtype), num_warps=4,
    )


def mlstm_forward(q, k, v, i, f, C0, n0, m0, chunk_size: int, eps: float, keep_states: bool, cfg: LaunchConfig,
                  mode: str):
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv), last dims contiguous, any layout otherwise (`token_strides`);
    i, f: (BH, T); C0 (BH, Dk, Dv), n0 (BH, Dk), m0 (BH) float32, BH = B * H; cfg: the launch config (complete,
    `config.launch_config`); mode: a precision preset (config.PRESETS key).

    Returns h (B, H, T, Dv) stored like v (`empty_like_layout`), the final state (C, n, m) and, for the backward, the
    chunk states (`chunk_states`; None each unless keep_states) and per-token m and denominator (BH, T).
    """
    B, H, T, Dk = q.shape
    BH = B * H
    Dv = v.shape[-1]
    L = chunk_size
    NC = triton.cdiv(T, L)
    dev = q.device
    cs, ns, ms, C_out, n_out = chunk_states(k, v, i, f, C0, n0, m0, chunk_size, cfg, mode)
    splits = _split_mask(q.dtype, mode)
    flags = dict(PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), MIX=_mix(q.dtype), SPLITS=splits)
    shape_class = (Dk, Dv, L, q.dtype, splits, cs.dtype, cfg)
    h = empty_like_layout(v, Dv, q.dtype)
    strides = (H, *token_strides(q), *token_strides(k), *token_strides(v), *token_strides(h))
    m_query = torch.empty(BH, T, device=dev, dtype=torch.float32)
    den = torch.empty(BH, T, device=dev, dtype=torch.float32)

    def output(BV):
        NVI = max(1, min(Dv, cfg.span_out) // BV)
        _output_kernel[(NC, BH, triton.cdiv(Dv, NVI * BV))](
            q, k, v, i, f, cs, ns, ms, h, m_query, den, T, NC, Dk, Dv, Dk**-0.5, eps, *strides,
            L=L, BKF=_pow2(Dk), BV=BV, NVI=NVI, num_warps=cfg.warps_out, **flags,
        )

    launch_with_fallback(("output", *shape_class), _halvings(cfg.block_v_out), output)
    m_final = ms[:, NC].clone()
    saved = (cs, ns, ms) if keep_states else (None, None, None)
    return h, (C_out, n_out, m_final), (*saved, m_query, den)
