"""Chunkwise mLSTM in Triton with the state kept on chip across chunks (MATH.md, "Chunkwise form").

The two-phase kernels (`forward.py`, `backward.py`) write the state of every chunk to memory and read it back in a
parallel pass. Here one program per (Dv-tile, batch*head) walks the chunks in order and carries the state in registers:

- `_fused_forward_kernel`: for each chunk, the outputs from the state entering the chunk plus the intra-chunk part,
  then the state update. The entering states are still stored when the backward needs them (one write, no read).
- `_fused_backward_kernel`: walks the chunks backwards carrying the gradient of the state (dC, dn) and computes dq,
  dk, dv and the gate sums of each chunk from it and from the stored entering state: the work of `_dstates_kernel`
  and `_grads_kernel` in one pass, without storing the state gradients.

The arithmetic (stabilizer, normalizer, row weights folded out of products, the pair sums for the forget-gate
gradient, the split mask) is that of the two-phase kernels, so both agree with the references to rounding.
With Dv over several tiles, dq, dk and the gate sums are float32 partial sums over the tiles (reduced afterwards).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import _cast, _chunk_gates, _dot, _mm


@triton.jit
def _tile(DK, DV, BKF: tl.constexpr, BV: tl.constexpr):
    """This program's Dv-tile: grid (Dv-tiles, BH). Full Dk (BKF, a power of two >= DK) per program."""
    iv = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, BKF)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    return iv, row, offs_k, offs_v, mask_k, mask_v


@triton.jit
def _fused_forward_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr,
    c0_ptr, n0_ptr, m0_ptr,
    h_ptr, mq_ptr, den_ptr,
    cs_ptr, ns_ptr, ms_ptr, c_out_ptr, n_out_ptr,
    T, NC, DK, DV, scale, eps,
    L: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, KEEP: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    iv, row, offs_k, offs_v, mask_k, mask_v = _tile(DK, DV, BKF, BV)
    offs_l = tl.arange(0, L)
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_off = row * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    causal = offs_l[:, None] >= offs_l[None, :]

    C = tl.load(c0_ptr + state_off, mask=mask_kv, other=0.0)
    n = tl.load(n0_ptr + row * DK + offs_k, mask=mask_k, other=0.0)
    m = tl.load(m0_ptr + row)
    for c in range(0, NC):
        if KEEP:  # the state entering the chunk, for the backward
            chunk_state = (row * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
            tl.store(cs_ptr + chunk_state, _cast(C, cs_ptr.dtype.element_ty, UPCAST), mask=mask_kv)
            if iv == 0:
                tl.store(ns_ptr + (row * NC + c) * DK + offs_k, n, mask=mask_k)
        if iv == 0:
            tl.store(ms_ptr + row * (NC + 1) + c, m)
        t0 = c * L
        b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
        rows = row * T + t0 + offs_l
        mask_lk = valid[:, None] & mask_k[None, :]
        mask_lv = valid[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + rows[:, None] * DK + offs_k[None, :], mask=mask_lk, other=0.0)
        k = tl.load(k_ptr + rows[:, None] * DK + offs_k[None, :], mask=mask_lk, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * DV + offs_v[None, :], mask=mask_lv, other=0.0)

        # outputs: intra-chunk scores plus the entering state (C, n, m)
        log_d = tl.where(causal, b[:, None] - b[None, :] + ig[None, :], float("-inf"))
        log_state = b + m
        m_query = tl.maximum(log_state, tl.max(log_d, 1))
        scores = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale * tl.exp(log_d - m_query[:, None])
        w_state = scale * tl.exp(log_state - m_query)  # (w q) @ C = w * (q @ C): q enters the product unrounded
        den = tl.sum(scores, 1) + w_state * tl.sum(q.to(tl.float32) * n[None, :], 1)
        z = tl.maximum(tl.abs(den), tl.exp(-m_query)) + eps
        num = _mm(scores, v, True, False, MIX, PRECISION, UPCAST, SPLITS & 2)
        num += w_state[:, None] * _mm(q, C, False, True, MIX, PRECISION, UPCAST, SPLITS & 4)
        h = num * (1.0 / z)[:, None]
        tl.store(h_ptr + rows[:, None] * DV + offs_v[None, :], _cast(h, h_ptr.dtype.element_ty, UPCAST), mask=mask_lv)
        if iv == 0:
            tl.store(mq_ptr + rows, m_query, mask=valid)
            tl.store(den_ptr + rows, den, mask=valid)

        # the state at the chunk's end
        a = g - b + ig
        m_new = tl.maximum(g + m, tl.max(a, 0))
        kw = k.to(tl.float32) * tl.exp(a - m_new)[:, None]
        decay = tl.exp(g + m - m_new)
        C = decay * C + _mm(tl.trans(kw), v, True, False, MIX, PRECISION, UPCAST, SPLITS & 1)
        n = decay * n + tl.sum(kw, 0)
        m = m_new
    tl.store(c_out_ptr + state_off, C, mask=mask_kv)
    if iv == 0:
        tl.store(n_out_ptr + row * DK + offs_k, n, mask=mask_k)
        tl.store(ms_ptr + row * (NC + 1) + NC, m)


@triton.jit
def _fused_backward_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, dh_ptr, rz_ptr, dden_ptr, mq_ptr,
    cs_ptr, ns_ptr, ms_ptr, dc_last_ptr, dn_last_ptr,
    dq_ptr, dk_ptr, dv_ptr, dlogf_ptr, kdk_ptr, dc0_ptr, dn0_ptr,
    T, NC, DK, DV, scale,
    L: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr,
):
    iv, row, offs_k, offs_v, mask_k, mask_v = _tile(DK, DV, BKF, BV)
    offs_l = tl.arange(0, L)
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_off = row * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    upper = offs_l[:, None] >= offs_l[None, :]
    first = iv == 0  # the normalizer's terms (dden, n, dn) count once, in the first Dv-tile's program

    dC = tl.load(dc_last_ptr + state_off, mask=mask_kv, other=0.0)  # gradient of the state at the chunk's end
    dn = tl.where(first, tl.load(dn_last_ptr + row * DK + offs_k, mask=mask_k, other=0.0), 0.0)
    for cc in range(0, NC):
        c = NC - 1 - cc
        t0 = c * L
        b, g, ig, valid = _chunk_gates(i_ptr, f_ptr, row, t0, T, L)
        rows = row * T + t0 + offs_l
        mask_lk = valid[:, None] & mask_k[None, :]
        mask_lv = valid[:, None] & mask_v[None, :]
        q = tl.load(q_ptr + rows[:, None] * DK + offs_k[None, :], mask=mask_lk, other=0.0)
        k = tl.load(k_ptr + rows[:, None] * DK + offs_k[None, :], mask=mask_lk, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * DV + offs_v[None, :], mask=mask_lv, other=0.0)
        dh = tl.load(dh_ptr + rows[:, None] * DV + offs_v[None, :], mask=mask_lv, other=0.0)
        m_query = tl.load(mq_ptr + rows, mask=valid, other=0.0)
        rz = tl.load(rz_ptr + rows, mask=valid, other=0.0)
        dden = tl.where(first, tl.load(dden_ptr + rows, mask=valid, other=0.0), 0.0)
        m_prev = tl.load(ms_ptr + row * (NC + 1) + c)
        m_next = tl.load(ms_ptr + row * (NC + 1) + c + 1)
        chunk_state = (row * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
        C = tl.load(cs_ptr + chunk_state, mask=mask_kv, other=0.0)
        n = tl.where(first, tl.load(ns_ptr + (row * NC + c) * DK + offs_k, mask=mask_k, other=0.0), 0.0)

        causal = upper & valid[:, None]
        w_query = tl.where(valid, tl.exp(b + m_prev - m_query), 0.0)  # weight of the entering state per query
        w_key = tl.where(valid, tl.exp(g - b + ig - m_next), 0.0)  # weight of each key in the chunk-end state
        chunk_decay = tl.exp(g + m_prev - m_next)
        decay = tl.where(causal, tl.exp(b[:, None] - b[None, :] + ig[None, :] - m_query[:, None]), 0.0)
        qk = _dot(q, tl.trans(k), PRECISION, UPCAST)

        # dv of this tile: intra-chunk (rz P)^T dh = P^T dnum, plus the keys' share of the chunk-end state gradient
        scores_rz = qk * (scale * decay * rz[:, None])
        dv = _mm(tl.trans(scores_rz), dh, True, False, MIX, PRECISION, UPCAST, SPLITS & 512)
        dv += w_key[:, None] * _mm(k, dC, False, True, MIX, PRECISION, UPCAST, SPLITS & 1024)
        tl.store(dv_ptr + rows[:, None] * DV + offs_v[None, :], _cast(dv, dv_ptr.dtype.element_ty, UPCAST),
                 mask=mask_lv)

        # this tile's share of the sums over Dv
        dscores = (_dot(dh, tl.trans(v), PRECISION, UPCAST) * rz[:, None] + dden[:, None]) * decay  # dL/dP * D
        dh_c = _mm(dh, tl.trans(C), False, True, MIX, PRECISION, UPCAST, SPLITS & 64)
        v_dc = _mm(v, tl.trans(dC), False, True, MIX, PRECISION, UPCAST, SPLITS & 256)
        carried = tl.sum(tl.sum(C.to(tl.float32) * dC, 1), 0) + tl.sum(n * dn, 0)

        # d(cumulative log-forget before t): sum over the (query >= t, key < t) pairs of dL/dlog(weight)
        pair = dscores * qk * scale  # pairs inside the chunk
        left = tl.cumsum(pair, 1) - pair
        crossing = tl.sum(tl.where(upper, left, 0.0), 0)
        dq_state = (scale * w_query * rz)[:, None] * dh_c + (scale * w_query * dden)[:, None] * n[None, :]
        q_state = tl.sum(q.to(tl.float32) * dq_state, 1)  # queries >= t in the chunk, keys before it
        crossing += tl.sum(q_state, 0) - tl.cumsum(q_state, 0) + q_state
        dk_state = w_key[:, None] * (v_dc + dn[None, :])
        k_state = tl.sum(k.to(tl.float32) * dk_state, 1)  # keys < t in the chunk, queries after it
        crossing += tl.cumsum(k_state, 0) - k_state
        crossing += chunk_decay * carried  # queries after the chunk, keys before it
        tl.store(dlogf_ptr + (iv * tl.num_programs(1)) * T + rows, crossing, mask=valid)

        dq = _mm(dscores, k, True, False, MIX, PRECISION, UPCAST, SPLITS & 32) * scale + dq_state
        dk = _mm(tl.trans(dscores), q, True, False, MIX, PRECISION, UPCAST, SPLITS & 128) * scale + dk_state
        dq_off = rows[:, None] * DK + offs_k[None, :]
        if NV == 1:
            tl.store(dq_ptr + dq_off, _cast(dq, dq_ptr.dtype.element_ty, UPCAST), mask=mask_lk)
            tl.store(dk_ptr + dq_off, _cast(dk, dk_ptr.dtype.element_ty, UPCAST), mask=mask_lk)
            tl.store(kdk_ptr + rows, tl.sum(k.to(tl.float32) * dk, 1), mask=valid)
        else:
            part = (iv * tl.num_programs(1) * T + rows)[:, None] * DK + offs_k[None, :]
            tl.store(dq_ptr + part, dq, mask=mask_lk)
            tl.store(dk_ptr + part, dk, mask=mask_lk)

        # the gradient of the state entering this chunk = at the end of the previous one
        w = tl.where(valid, scale * w_query, 0.0)
        # (w q)^T (rz dh) = q^T ((w rz) dh): the row weights ride on one operand, q enters unrounded
        dC = chunk_decay * dC + _mm(tl.trans(q), dh.to(tl.float32) * (w * rz)[:, None], False, True, MIX,
                                    PRECISION, UPCAST, SPLITS & 8)
        dn = chunk_decay * dn + tl.sum(q.to(tl.float32) * (w * dden)[:, None], 0)
    tl.store(dc0_ptr + state_off, dC, mask=mask_kv)
    if iv == 0:
        tl.store(dn0_ptr + row * DK + offs_k, dn, mask=mask_k)


def fused_forward(q, k, v, i, f, C0, n0, m0, cfg, flags, state_dtype, keep_states: bool, eps: float):
    """As `forward.mlstm_forward`; cfg gives L, BV_FUSED, WARPS_FUSED_FWD. Returns h, the final state and the
    saved tensors (chunk states or None, ms, m_query, den)."""
    BH, T, Dk = q.shape
    Dv = v.shape[-1]
    L, BV = cfg["L"], min(cfg["BV_FUSED"], max(16, triton.next_power_of_2(Dv)))
    NC = triton.cdiv(T, L)
    dev = q.device
    h = torch.empty(BH, T, Dv, device=dev, dtype=q.dtype)
    m_query = torch.empty(BH, T, device=dev, dtype=torch.float32)
    den = torch.empty(BH, T, device=dev, dtype=torch.float32)
    ms = torch.empty(BH, NC + 1, device=dev, dtype=torch.float32)
    if keep_states:
        cs = torch.empty(BH, NC, Dk, Dv, device=dev, dtype=state_dtype)
        ns = torch.empty(BH, NC, Dk, device=dev, dtype=torch.float32)
    else:
        cs = ns = ms  # not written (KEEP is off)
    C_out = torch.empty(BH, Dk, Dv, device=dev, dtype=torch.float32)
    n_out = torch.empty(BH, Dk, device=dev, dtype=torch.float32)
    _fused_forward_kernel[(triton.cdiv(Dv, BV), BH)](
        q, k, v, i, f, C0, n0, m0, h, m_query, den, cs, ns, ms, C_out, n_out, T, NC, Dk, Dv, Dk**-0.5, eps,
        L=L, BKF=max(16, triton.next_power_of_2(Dk)), BV=BV, KEEP=keep_states, num_warps=cfg["WARPS_FUSED_FWD"],
        **flags,
    )
    saved = (cs, ns, ms) if keep_states else (None, None, ms)
    return h, (C_out, n_out, ms[:, NC].clone()), (*saved, m_query, den)


def fused_backward(q, k, v, i, f, dh, rz, dden, m_query, cs, ns, ms, dC_last, dn_last, cfg, flags):
    """dq, dk, dv (dtype of the inputs, or float32 partial sums over Dv-tiles with a leading tile axis), the crossing
    sums (tiles, BH, T), k.dk (BH, T; None with several tiles) and the initial state's gradient (dC0, dn0)."""
    BH, T, Dk = q.shape
    Dv = v.shape[-1]
    L, BV = cfg["L"], min(cfg["BV_FUSED"], max(16, triton.next_power_of_2(Dv)))
    NC = triton.cdiv(T, L)
    NV = triton.cdiv(Dv, BV)
    dev = q.device
    if NV == 1:
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        kdk = torch.empty(BH, T, device=dev, dtype=torch.float32)
    else:
        dq = torch.empty(NV, BH, T, Dk, device=dev, dtype=torch.float32)
        dk = torch.empty(NV, BH, T, Dk, device=dev, dtype=torch.float32)
        kdk = None
    dv = torch.empty_like(v)
    dlogf = torch.empty(NV, BH, T, device=dev, dtype=torch.float32)
    dC0 = torch.empty(BH, Dk, Dv, device=dev, dtype=torch.float32)
    dn0 = torch.empty(BH, Dk, device=dev, dtype=torch.float32)
    _fused_backward_kernel[(NV, BH)](
        q, k, v, i, f, dh, rz, dden, m_query, cs, ns, ms, dC_last, dn_last, dq, dk, dv, dlogf,
        kdk if kdk is not None else dlogf, dC0, dn0, T, NC, Dk, Dv, Dk**-0.5,
        L=L, BKF=max(16, triton.next_power_of_2(Dk)), BV=BV, NV=NV, num_warps=cfg["WARPS_FUSED_BWD"], **flags,
    )
    return dq, dk, dv, dlogf, kdk, dC0, dn0
