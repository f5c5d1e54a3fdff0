"""Chunkwise mLSTM backward in Triton: two kernels plus a little elementwise PyTorch on (BH, T) scalars.

With the stabilizer treated as a constant (its effect on h is only through `eps`), each output is
h_t = num_t / z_t with z_t = max(|den_t|, exp(-m_t)) + eps, so
    dnum_t = dh_t / z_t,   dden_t = -(dh_t . h_t) / z_t * sign(den_t) * [|den_t| > exp(-m_t)],
and (num, den) is a gated linear attention with values [v, 1] and state [C, n].

1. `_dstates_kernel` walks the chunks backwards and stores, for each chunk, the gradient of the state at its end
   (dC: Dk x Dv, dn: Dk); what is left after the first chunk is the gradient of the initial state. With few
   batch*head rows: the chunk-parallel form (`_chunk_dupdate_kernel`, then forward.py's `_chunk_scan_kernel` in
   reverse).
2. `_grads_kernel` runs every (chunk, batch*head, Dv-tile) in parallel: dq, dk, dv from the intra-chunk part, the
   state entering the chunk (for dq) and the state gradient at its end (for dk, dv), and per token q.dq and k.dk.
Gate gradients: di_t = k_t . dk_t; the gradient of the cumulative log-forget before t is the sum of dL/dlog(weight)
over every (query >= t, key < t) pair, which the gradient kernel accumulates per token without cancellation (see
`_grads_kernel`); plus the final state's stabilizer routed through its max; df = that * sigmoid(-f). dh . h for the
normalizer is one Triton pass (`row_dot`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .config import LaunchConfig
from .forward import (
    _cast,
    _chunk_gates,
    _dot,
    _halvings,
    _mix,
    _mm,
    _pow2,
    _precision,
    _split_mask,
    _state_tile,
    _token_offsets,
    _upcast,
    chunk_scan,
    empty_like_layout,
    launch_with_fallback,
    token_strides,
    use_chunk_scan,
)


@triton.jit
def _dstates_kernel(
    q_ptr, dh_ptr, rz_ptr, dden_ptr, mq_ptr, i_ptr, f_ptr, ms_ptr,
    dc_last_ptr, dn_last_ptr,
    dcs_ptr, dns_ptr, dc0_ptr, dn0_ptr,
    T, NC, DK, DV, scale, H, q_sb, q_sh, q_st, dh_sb, dh_sh, dh_st,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    row, ik, iv, offs_k, offs_v, mask_k, mask_v, mask_kv, state_off = _state_tile(
        DK, DV, BK, BV, NV, tl.program_id(0), tl.program_id(1))
    offs_l = tl.arange(0, L)

    dC = tl.load(dc_last_ptr + state_off, mask=mask_kv, other=0.0)
    dn = tl.load(dn_last_ptr + row * DK + offs_k, mask=mask_k, other=0.0)
    for cc in range(0, NC):
        c = NC - 1 - cc
        chunk_state = (row * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        tl.store(dcs_ptr + chunk_state, _cast(dC, dcs_ptr.dtype.element_ty, UPCAST), mask=mask_kv)
        if iv == 0:
            tl.store(dns_ptr + (row * NC + c) * DK + offs_k, dn, mask=mask_k)
        t0 = c * L
        b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
        m_prev = tl.load(ms_ptr + row * (NC + 1) + c)
        m_next = tl.load(ms_ptr + row * (NC + 1) + c + 1)
        rows = row * T + t0 + offs_l
        m_query = tl.load(mq_ptr + rows, mask=valid, other=0.0)
        rz = tl.load(rz_ptr + rows, mask=valid, other=0.0)
        dden = tl.load(dden_ptr + rows, mask=valid, other=0.0)
        w = tl.where(valid, scale * tl.exp(b + m_prev - m_query), 0.0)
        q_rows = _token_offsets(row, t0 + offs_l, H, q_sb, q_sh, q_st)
        dh_rows = _token_offsets(row, t0 + offs_l, H, dh_sb, dh_sh, dh_st)
        q = tl.load(q_ptr + q_rows[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        dh = tl.load(dh_ptr + dh_rows[:, None] + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
        decay = tl.exp(g + m_prev - m_next)
        # (w q)^T (rz dh) = q^T ((w rz) dh): the row weights ride on one operand, q enters unrounded
        dC = decay * dC + _mm(tl.trans(q), dh.to(tl.float32) * (w * rz)[:, None], False, True, MIX, PRECISION,
                              UPCAST, SPLITS & 8)
        dn = decay * dn + tl.sum(q.to(tl.float32) * (w * dden)[:, None], 0)
    tl.store(dc0_ptr + state_off, dC, mask=mask_kv)
    if iv == 0:
        tl.store(dn0_ptr + row * DK + offs_k, dn, mask=mask_k)


@triton.jit
def _chunk_dupdate_kernel(
    q_ptr, dh_ptr, rz_ptr, dden_ptr, mq_ptr, i_ptr, f_ptr, ms_ptr,
    dcs_ptr, dns_ptr, dc0_ptr, dn0_ptr, decay_ptr,
    T, NC, DK, DV, scale, H, q_sb, q_sh, q_st, dh_sb, dh_sh, dh_st,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    """The chunk-parallel form of `_dstates_kernel` (forward.py explains it), one (chunk, state tile, batch*head):
    chunk c's own term of the state-gradient recurrence, q^T ((w rz) dh) and sum(q w dden), stored where the gradient
    at the start of the chunk goes (slot c - 1, or the initial state's gradient for the first chunk), and its decay."""
    c = tl.program_id(0)
    row, ik, iv, offs_k, offs_v, mask_k, mask_v, mask_kv, state_off = _state_tile(
        DK, DV, BK, BV, NV, tl.program_id(1), tl.program_id(2))
    t0 = c * L
    b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
    m_prev = tl.load(ms_ptr + row * (NC + 1) + c)
    m_next = tl.load(ms_ptr + row * (NC + 1) + c + 1)
    rows = row * T + t0 + tl.arange(0, L)
    m_query = tl.load(mq_ptr + rows, mask=valid, other=0.0)
    rz = tl.load(rz_ptr + rows, mask=valid, other=0.0)
    dden = tl.load(dden_ptr + rows, mask=valid, other=0.0)
    w = tl.where(valid, scale * tl.exp(b + m_prev - m_query), 0.0)
    q_rows = _token_offsets(row, t0 + tl.arange(0, L), H, q_sb, q_sh, q_st)
    dh_rows = _token_offsets(row, t0 + tl.arange(0, L), H, dh_sb, dh_sh, dh_st)
    q = tl.load(q_ptr + q_rows[:, None] + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
    dh = tl.load(dh_ptr + dh_rows[:, None] + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
    update = _mm(tl.trans(q), dh.to(tl.float32) * (w * rz)[:, None], False, True, MIX, PRECISION, UPCAST, SPLITS & 8)
    n_update = tl.sum(q.to(tl.float32) * (w * dden)[:, None], 0)
    if c == 0:
        tl.store(dc0_ptr + state_off, update, mask=mask_kv)
        if iv == 0:
            tl.store(dn0_ptr + row * DK + offs_k, n_update, mask=mask_k)
    else:
        slot = (row * NC + c - 1) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        tl.store(dcs_ptr + slot, _cast(update, dcs_ptr.dtype.element_ty, UPCAST), mask=mask_kv)
        if iv == 0:
            tl.store(dns_ptr + (row * NC + c - 1) * DK + offs_k, n_update, mask=mask_k)
    if (ik == 0) & (iv == 0):
        tl.store(decay_ptr + row * NC + c, tl.exp(g + m_prev - m_next))


@triton.jit
def _grads_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, dh_ptr, rz_ptr, dden_ptr, mq_ptr,
    cs_ptr, ns_ptr, ms_ptr, dcs_ptr, dns_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlogf_ptr, kdk_ptr,
    T, NC, DK, DV, scale,
    H, q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st, dh_sb, dh_sh, dh_st,
    dq_sb, dq_sh, dq_st, dk_sb, dk_sh, dk_st, dv_sb, dv_sh, dv_st,
    L: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, NVI: tl.constexpr, NV: tl.constexpr,
    PART: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    """One (chunk, batch*head, span of NVI Dv-tiles of width BV); PART 0: dq and the query side of the gate sums,
    PART 1: dk, dv and the key side (two launches hold fewer tiles live), PART 2: both in one launch. With NV > 1
    spans, dq, dk and the gate sums are float32 partial sums over the spans (reduced afterwards)."""
    c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    iv = tl.program_id(2)
    t0 = c * L
    offs_l = tl.arange(0, L)
    offs_k = tl.arange(0, BKF)
    mask_k = offs_k < DK

    b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
    rows = row * T + t0 + offs_l
    t = t0 + offs_l
    v_rows = _token_offsets(row, t, H, v_sb, v_sh, v_st)
    dh_rows = _token_offsets(row, t, H, dh_sb, dh_sh, dh_st)
    dv_rows = _token_offsets(row, t, H, dv_sb, dv_sh, dv_st)
    mask_lk = valid[:, None] & mask_k[None, :]
    q_rows = _token_offsets(row, t, H, q_sb, q_sh, q_st)
    k_rows = _token_offsets(row, t, H, k_sb, k_sh, k_st)
    q = tl.load(q_ptr + q_rows[:, None] + offs_k[None, :], mask=mask_lk, other=0.0)
    k = tl.load(k_ptr + k_rows[:, None] + offs_k[None, :], mask=mask_lk, other=0.0)
    m_query = tl.load(mq_ptr + rows, mask=valid, other=0.0)
    rz = tl.load(rz_ptr + rows, mask=valid, other=0.0)
    dden = tl.load(dden_ptr + rows, mask=valid, other=0.0)
    dden = tl.where(iv == 0, dden, 0.0)  # the denominator's gradient counts once, not per Dv-span
    m_prev = tl.load(ms_ptr + row * (NC + 1) + c)
    m_next = tl.load(ms_ptr + row * (NC + 1) + c + 1)
    causal = (offs_l[:, None] >= offs_l[None, :]) & valid[:, None]
    w_query = tl.where(valid, tl.exp(b + m_prev - m_query), 0.0)  # weight of the entering state for each query
    w_key = tl.where(valid, tl.exp(g - b + ig - m_next), 0.0)  # weight of each key in the state at the chunk end
    if PART != 0:
        decay = tl.where(causal, tl.exp(b[:, None] - b[None, :] + ig[None, :] - m_query[:, None]), 0.0)
        scores_rz = _dot(q, tl.trans(k), PRECISION, UPCAST) * (scale * decay * rz[:, None])  # (rz P)^T dh = P^T dnum

    # sums over Dv, tile by tile: dh v^T; query side: dh C^T and <C, dC>; key side: v dC^T, and dv of each tile
    dh_v = tl.zeros((L, L), dtype=tl.float32)
    dh_c = tl.zeros((L, BKF), dtype=tl.float32)
    v_dc = tl.zeros((L, BKF), dtype=tl.float32)
    carried = 0.0
    for j in range(0, NVI):
        offs_v = (iv * NVI + j) * BV + tl.arange(0, BV)
        mask_v = offs_v < DV
        mask_lv = valid[:, None] & mask_v[None, :]
        mask_kv = mask_k[:, None] & mask_v[None, :]
        v = tl.load(v_ptr + v_rows[:, None] + offs_v[None, :], mask=mask_lv, other=0.0)
        dh = tl.load(dh_ptr + dh_rows[:, None] + offs_v[None, :], mask=mask_lv, other=0.0)
        chunk_state = (row * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        dC = tl.load(dcs_ptr + chunk_state, mask=mask_kv, other=0.0)
        dh_v += _dot(dh, tl.trans(v), PRECISION, UPCAST)
        if PART != 1:
            C = tl.load(cs_ptr + chunk_state, mask=mask_kv, other=0.0)
            dh_c += _mm(dh, tl.trans(C), False, True, MIX, PRECISION, UPCAST, SPLITS & 64)
            carried += tl.sum(tl.sum(C.to(tl.float32) * dC.to(tl.float32), 1), 0)
        if PART != 0:
            v_dc += _mm(v, tl.trans(dC), False, True, MIX, PRECISION, UPCAST, SPLITS & 256)
            dv = _mm(tl.trans(scores_rz), dh, True, False, MIX, PRECISION, UPCAST, SPLITS & 512)
            dv += w_key[:, None] * _mm(k, dC, False, True, MIX, PRECISION, UPCAST, SPLITS & 1024)
            tl.store(dv_ptr + dv_rows[:, None] + offs_v[None, :], _cast(dv, dv_ptr.dtype.element_ty, UPCAST),
                     mask=mask_lv)

    decay = tl.where(causal, tl.exp(b[:, None] - b[None, :] + ig[None, :] - m_query[:, None]), 0.0)
    dscores = (dh_v * rz[:, None] + dden[:, None]) * decay  # dL/dP * D
    # d(cumulative log-forget before t) = sum over (query >= t, key < t) pairs of dL/dlog(weight): no cancellation
    # (a reverse cumsum of q.dq - k.dk over T cancels, and amplifies rounding ~sqrt(T)).
    dq_off = _token_offsets(row, t, H, dq_sb, dq_sh, dq_st)[:, None] + offs_k[None, :]
    dk_off = _token_offsets(row, t, H, dk_sb, dk_sh, dk_st)[:, None] + offs_k[None, :]
    part = (iv * tl.num_programs(1) * T + rows)[:, None] * DK + offs_k[None, :]
    dn = tl.load(dns_ptr + (row * NC + c) * DK + offs_k, mask=mask_k, other=0.0)
    dn = tl.where(iv == 0, dn, 0.0)
    crossing = tl.zeros((L,), dtype=tl.float32)
    if PART != 1:
        n = tl.load(ns_ptr + (row * NC + c) * DK + offs_k, mask=mask_k, other=0.0)
        dq_state = (scale * w_query * rz)[:, None] * dh_c + (scale * w_query * dden)[:, None] * n[None, :]
        pair = dscores * _dot(q, tl.trans(k), PRECISION, UPCAST) * scale  # dL/dlog D for pairs in the chunk
        left = tl.cumsum(pair, 1) - pair  # sum over keys s < t of row t'
        upper = offs_l[:, None] >= offs_l[None, :]  # rows t' >= t (column t)
        crossing += tl.sum(tl.where(upper, left, 0.0), 0)
        q_state = tl.sum(q.to(tl.float32) * dq_state, 1)  # queries >= t in the chunk, keys before the chunk
        crossing += tl.sum(q_state, 0) - tl.cumsum(q_state, 0) + q_state
        carried += tl.sum(n * dn, 0)
        crossing += tl.exp(g + m_prev - m_next) * carried  # queries after, keys before the chunk
        dq = _mm(dscores, k, True, False, MIX, PRECISION, UPCAST, SPLITS & 32) * scale + dq_state
        if NV == 1:
            tl.store(dq_ptr + dq_off, _cast(dq, dq_ptr.dtype.element_ty, UPCAST), mask=mask_lk)
        else:
            tl.store(dq_ptr + part, dq, mask=mask_lk)
    if PART != 0:
        dk_state = w_key[:, None] * (v_dc + dn[None, :])
        k_state = tl.sum(k.to(tl.float32) * dk_state, 1)  # keys < t in the chunk, queries after the chunk
        crossing += tl.cumsum(k_state, 0) - k_state
        dk = _mm(tl.trans(dscores), q, True, False, MIX, PRECISION, UPCAST, SPLITS & 128) * scale + dk_state
        if NV == 1:
            tl.store(dk_ptr + dk_off, _cast(dk, dk_ptr.dtype.element_ty, UPCAST), mask=mask_lk)
            tl.store(kdk_ptr + rows, tl.sum(k.to(tl.float32) * dk, 1), mask=valid)
        else:
            tl.store(dk_ptr + part, dk, mask=mask_lk)
    tl.store(dlogf_ptr + (((PART % 2) * NV + iv) * tl.num_programs(1)) * T + rows, crossing, mask=valid)


@triton.jit
def _row_dot_kernel(a_ptr, b_ptr, out_ptr, T, D, H, a_sb, a_sh, a_st, b_sb, b_sh, b_st,
                    BT: tl.constexpr, BD: tl.constexpr):
    """out[row, t] = sum_d a[row, t, d] * b[row, t, d] in float32, BT tokens of one batch*head row per program."""
    row = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    valid = t < T
    a_rows = _token_offsets(row, t, H, a_sb, a_sh, a_st)
    b_rows = _token_offsets(row, t, H, b_sb, b_sh, b_st)
    acc = tl.zeros((BT,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        mask = valid[:, None] & (cols < D)[None, :]
        a = tl.load(a_ptr + a_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + b_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, 1)
    tl.store(out_ptr + row * T + t, acc, mask=valid)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) in float32 for (B, H, T, D) tensors with contiguous last dims (any layout otherwise), in one
    pass (no float32 copies of a and b): -> (B * H, T)."""
    B, H, T, D = a.shape
    out = torch.empty(B * H, T, device=a.device, dtype=torch.float32)
    BD = min(_pow2(D), 128)
    _row_dot_kernel[(triton.cdiv(T, 64), B * H)](a, b, out, T, D, H, *token_strides(a), *token_strides(b),
                                                 BT=64, BD=BD, num_warps=4)
    return out


def mlstm_backward(q, k, v, i, f, h, dh, dC_last, dn_last, dm_last, state0, final_state, saved, chunk_size, eps,
                   cfg: LaunchConfig, mode: str):
    """Gradients of q, k, v (B, H, T, D), each stored like its input (`empty_like_layout`), of i, f (BH, T) and of the
    initial state (C0, n0, m0). q, k, v, h, dh: (B, H, T, D) with contiguous last dims, any layout otherwise; cfg and
    mode: the forward's launch config and precision preset."""
    cs, ns, ms, m_query, den = saved
    C0, n0, m0 = state0
    C_T, n_T, _ = final_state
    B, H, T, Dk = q.shape
    L = chunk_size
    dev = q.device
    flags = dict(PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), MIX=_mix(q.dtype),
                 SPLITS=_split_mask(q.dtype, mode))
    if dh.stride(-1) != 1:
        dh = dh.contiguous()

    # per-token normalizer gradients (BH, T)
    z = torch.maximum(den.abs(), torch.exp(-m_query)) + eps
    rz = 1.0 / z
    delta = row_dot(dh, h)
    active = (den.abs() > torch.exp(-m_query)).float()
    dden = -delta * rz * torch.sign(den) * active

    dq, dk, dv, dlogf, kdk, dC0, dn0, NVG = _grads(
        q, k, v, i, f, dh, rz, dden, m_query, cs, ns, ms, dC_last, dn_last, L, cfg, flags)
    dlog_f = dlogf.sum(0)
    if NVG > 1:
        dq, dk = dq.sum(0).view(q.shape), dk.sum(0).view(k.shape)
        kdk = row_dot(k, dk)
        dq, dk = dq.to(q.dtype), dk.to(k.dtype)

    # gate gradients: dlog_f (from the kernel) covers every pair of (query or final state, key or initial state)
    # crossing t; add the final stabilizer's gradient (m_T = F_T + max(m0, max_s (i_s - F_s))), routed through its max
    di = kdk.clone()
    final_dot = (C_T * dC_last).sum((-2, -1)) + (n_T * dn_last).sum(-1)
    dm_total = dm_last - final_dot
    dlog_f = dlog_f + dm_total[:, None]
    log_f_cumsum = torch.cumsum(F.logsigmoid(f.float()), dim=-1)
    source = i.float() - log_f_cumsum  # m_T - F_T = max(m0, max_s (i_s - F_s))
    best, where = source.max(dim=-1)
    from_state = m0 >= best
    route = torch.where(from_state, torch.zeros_like(dm_total), dm_total)
    di.scatter_add_(1, where[:, None], route[:, None])
    before = torch.arange(T, device=dev)[None, :] <= where[:, None]
    dlog_f = dlog_f - route[:, None] * before
    df = dlog_f * torch.sigmoid(-f.float())
    dm0 = (C0 * dC0).sum((-2, -1)) + (n0 * dn0).sum(-1) + torch.where(from_state, dm_total, torch.zeros_like(dm_total))
    return dq, dk, dv, di.to(i.dtype), df.to(f.dtype), dC0, dn0, dm0


def _grads(q, k, v, i, f, dh, rz, dden, m_query, cs, ns, ms, dC_last, dn_last, L, cfg, flags):
    """`_dstates_kernel` then `_grads_kernel`: dq, dk, dv (or float32 partial sums over Dv-spans), crossing sums,
    k.dk, dC0, dn0 and the number of Dv-spans."""
    B, H, T, Dk = q.shape
    BH = B * H
    Dv = v.shape[-1]
    NC = triton.cdiv(T, L)
    strides_q_dh = (H, *token_strides(q), *token_strides(dh))
    dev = q.device
    scale = Dk**-0.5
    shape_class = (Dk, Dv, L, q.dtype, flags["SPLITS"], cfg)
    dcs = torch.empty_like(cs)
    dns = torch.empty_like(ns)
    dC0 = torch.empty(BH, Dk, Dv, device=dev, dtype=torch.float32)
    dn0 = torch.empty(BH, Dk, device=dev, dtype=torch.float32)

    def dstates(BV):
        NK, NV = triton.cdiv(Dk, cfg.block_k), triton.cdiv(Dv, BV)
        _dstates_kernel[(NK * NV, BH)](
            q, dh, rz, dden, m_query, i, f, ms, dC_last, dn_last, dcs, dns, dC0, dn0, T, NC, Dk, Dv, scale,
            *strides_q_dh, L=L, BK=cfg.block_k, BV=BV, NV=NV, num_warps=cfg.warps_dstates, **flags,
        )

    if use_chunk_scan(BH, Dk, Dv, NC, cfg):
        decay = torch.empty(BH, NC, device=dev, dtype=torch.float32)

        def dupdates(BV):
            NK, NV = triton.cdiv(Dk, cfg.block_k), triton.cdiv(Dv, BV)
            _chunk_dupdate_kernel[(NC, NK * NV, BH)](
                q, dh, rz, dden, m_query, i, f, ms, dcs, dns, dC0, dn0, decay, T, NC, Dk, Dv, scale,
                *strides_q_dh, L=L, BK=cfg.block_k, BV=BV, NV=NV, num_warps=4, **flags,
            )

        launch_with_fallback(("dupdates", *shape_class), _halvings(cfg.block_v), dupdates)
        chunk_scan(dcs, dC_last, dC0, decay, cfg, reverse=True)
        chunk_scan(dns, dn_last, dn0, decay, cfg, reverse=True)
    else:
        launch_with_fallback(("dstates", *shape_class), _halvings(cfg.block_v), dstates)

    dv = empty_like_layout(v, Dv, v.dtype)
    kdk = torch.empty(BH, T, device=dev, dtype=torch.float32)
    grads = {}

    def grad_kernel(BV):
        NVI = max(1, min(Dv, cfg.span_grad) // BV)
        NVG = triton.cdiv(Dv, NVI * BV)
        if NVG == 1:
            dq, dk = empty_like_layout(q, Dk, q.dtype), empty_like_layout(k, Dk, k.dtype)
            out_strides = (*token_strides(dq), *token_strides(dk))
        else:  # float32 partial sums (NVG, BH, T, Dk), addressed by row and t in the kernel
            dq = torch.empty(NVG, BH, T, Dk, device=dev, dtype=torch.float32)
            dk = torch.empty(NVG, BH, T, Dk, device=dev, dtype=torch.float32)
            out_strides = (*token_strides(dq[0].view(B, H, T, Dk)),) * 2
        parts = (2,) if cfg.grad_fused else (0, 1)
        dlogf = torch.empty(len(parts) * NVG, BH, T, device=dev, dtype=torch.float32)
        for part in parts:
            _grads_kernel[(NC, BH, NVG)](
                q, k, v, i, f, dh, rz, dden, m_query, cs, ns, ms, dcs, dns, dq, dk, dv, dlogf, kdk, T, NC, Dk, Dv,
                scale, H, *token_strides(q), *token_strides(k), *token_strides(v), *token_strides(dh), *out_strides,
                *token_strides(dv), L=L, BKF=_pow2(Dk), BV=BV, NVI=NVI, NV=NVG, PART=part,
                num_warps=cfg.warps_grad, **flags,
            )
        grads.update(dq=dq, dk=dk, dlogf=dlogf, NVG=NVG)

    launch_with_fallback(("grads", *shape_class), _halvings(cfg.block_v_grad), grad_kernel)
    return grads["dq"], grads["dk"], dv, grads["dlogf"], kdk, dC0, dn0, grads["NVG"]

