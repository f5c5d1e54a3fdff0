"""Chunkwise gated delta rule backward in Triton: two kernels (notation of forward.py; per chunk, S the entering
state, dS' the gradient of the state at its end, T = (I + M)^-1).

1. `_dstates_kernel`, one program per (Dv-tile, batch*head) walking the chunks backwards: the gradient of U (through
   the outputs and the end state) dU = (causal decay * Q K^T)^T dO + diag(exp(gamma_L - gamma)) K dS', stored, and
   dS <- exp(gamma_L) dS' + (exp(gamma) Q)^T dO - W^T dU; what is left is the initial state's gradient.
2. `_grads_kernel`, every (chunk, batch*head) in parallel: dQ, dK, dV, dg, dbeta. With U = U0 - W S, the gradient of
   M simplifies to dM = -T^T dU U^T (and its transpose -U dU^T T), so both T and T^T are built (each by its own
   squarings of M or M^T) and no computed tile is ever transposed (`tl.trans` of a matrix-unit result feeding another
   product is the pattern behind fla #640); K K^T is symmetric, so one product serves both orientations.
Log-decay gradients: each (t, s) pair's exp(gamma_t - gamma_s) gives +row sum -column sum, the entering state
exp(gamma_t) and exp(gamma_L), W's exp(gamma_t), then dg = reverse cumsum over the chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import (
    LENGTHS,
    chunk_tokens,
    decay_matrix,
    document_masks,
    launch,
    load_cols,
    load_decay,
    load_gates,
    load_rows,
    load_state,
    precisions,
    sizes,
    store_state,
    unit_triangular_inverse,
    value_tile,
)


@triton.jit
def _upper_decay(gamma, same, STRICT: tl.constexpr, L: tl.constexpr):
    """exp(gamma_t - gamma_s) at [s, t] for s < t (STRICT) or s <= t within one document (`same`, symmetric), else
    0: the transposed decay, built directly."""
    offs = tl.arange(0, L)
    keep = offs[None, :] > offs[:, None] if STRICT else offs[None, :] >= offs[:, None]
    return tl.exp(tl.where(keep & same, gamma[None, :] - gamma[:, None], float("-inf")))


@triton.jit(do_not_specialize=LENGTHS)
def _dstates_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, starts_ptr, do_ptr, ds_last_ptr,
    dstates_ptr, du_ptr, ds0_ptr,
    T, H, NC, DK, DV, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    iv = tl.program_id(0)
    row = tl.program_id(1)
    dS = load_state(ds_last_ptr, row, 0, 1, DK, DV, BK, BV, iv)
    for cc in range(0, NC):
        c = NC - 1 - cc
        store_state(dstates_ptr, dS, row, c, NC, DK, DV, BK, BV, iv)
        tokens, valid = chunk_tokens(row, c, T, H, L)
        gamma, g_total = load_decay(g_ptr, tokens, valid)
        same, from_state, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
        k = load_rows(k_ptr, tokens, valid, DK, BK, 0)
        qT = load_cols(q_ptr, tokens, valid, DK, BK, 0) * scale
        scores_T = tl.dot(k, qT, input_precision=PRECISION) * _upper_decay(gamma, same, False, L)  # [s, t]
        u_offs, mask_u = value_tile(tokens, valid, iv, DV, BV)
        do = tl.load(do_ptr + u_offs, mask=mask_u, other=0.0).to(tl.float32)
        du = tl.dot(scores_T, do, input_precision=PRECISION)
        du += tl.dot(k * (tl.exp(g_total - gamma) * to_end)[:, None], dS, input_precision=PRECISION)
        tl.store(du_ptr + u_offs, du, mask=mask_u)
        dS = tl.exp(g_total) * keeps * dS + tl.dot(qT * (tl.exp(gamma) * from_state)[None, :], do,
                                                   input_precision=PRECISION)
        dS -= tl.dot(load_cols(w_ptr, tokens, valid, DK, BK, 0), du, input_precision=PRECISION)
    store_state(ds0_ptr, dS, row, 0, 1, DK, DV, BK, BV, iv)


@triton.jit
def _operand(tile, ptr, tokens, valid, DK, BK: tl.constexpr, factor, TRANSPOSED: tl.constexpr, RELOAD: tl.constexpr):
    """A (L, Dk) input tile for one product: `tile` as held, or with RELOAD read again (times `factor`, transposed
    like load_cols), so that its split copies in shared memory live only as long as that product."""
    if RELOAD:
        if TRANSPOSED:
            tile = load_cols(ptr, tokens, valid, DK, BK, 0) * factor
        else:
            tile = load_rows(ptr, tokens, valid, DK, BK, 0) * factor
    return tile


@triton.jit(do_not_specialize=LENGTHS)
def _grads_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, starts_ptr, u_ptr, states_ptr, dstates_ptr, do_ptr, du_ptr,
    dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,
    T, H, NC, DK, DV, scale,
    L: tl.constexpr, LOG2_L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, INVERSE_PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr, RELOAD: tl.constexpr,
):
    c = tl.program_id(0)
    row = tl.program_id(1)
    tokens, valid = chunk_tokens(row, c, T, H, L)
    gamma, g_total, beta = load_gates(g_ptr, beta_ptr, tokens, valid)
    offs = tl.arange(0, L)
    same, from_state, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    from_start = tl.exp(gamma) * from_state  # how the entering state reaches each token

    q = load_rows(q_ptr, tokens, valid, DK, BK, 0) * scale
    k = load_rows(k_ptr, tokens, valid, DK, BK, 0)
    kT = load_cols(k_ptr, tokens, valid, DK, BK, 0)
    offs_k = tl.arange(0, BK)
    mask_k = valid[:, None] & (offs_k < DK)[None, :]
    base = (row.to(tl.int64) * NC + c) * DK * DV

    # Everything that sums over Dv, one Dv-tile at a time (BV wide): products with the state and the end state's
    # gradient, and the (L, L) products of dO, dU and U
    do_u = tl.zeros((L, L), tl.float32)  # [t, s] = dO_t . U_s
    u_do = tl.zeros((L, L), tl.float32)  # [s, t]
    du_u = tl.zeros((L, L), tl.float32)  # [t, s] = dU_t . U_s
    u_du = tl.zeros((L, L), tl.float32)  # [s, t]
    do_S = tl.zeros((L, BK), tl.float32)  # dO S^T
    dw = tl.zeros((L, BK), tl.float32)  # -dU S^T (U = U0 - W S)
    u_dS = tl.zeros((L, BK), tl.float32)  # U dS'^T
    S_dS = tl.zeros((BK,), tl.float32)  # row sums of S * dS'
    for start in range(0, DV, BV):
        u = load_rows(u_ptr, tokens, valid, DV, BV, start)
        do = load_rows(do_ptr, tokens, valid, DV, BV, start)
        du = load_rows(du_ptr, tokens, valid, DV, BV, start)
        uT = load_cols(u_ptr, tokens, valid, DV, BV, start)
        do_u += tl.dot(do, uT, input_precision=PRECISION)
        du_u += tl.dot(du, uT, input_precision=PRECISION)
        u_do += tl.dot(u, load_cols(do_ptr, tokens, valid, DV, BV, start), input_precision=PRECISION)
        u_du += tl.dot(u, load_cols(du_ptr, tokens, valid, DV, BV, start), input_precision=PRECISION)
        offs_v = start + tl.arange(0, BV)
        here = base + offs_k[:, None] * DV + offs_v[None, :]
        mask_kv = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
        here_T = base + offs_k[None, :] * DV + offs_v[:, None]
        mask_T = (offs_v < DV)[:, None] & (offs_k < DK)[None, :]
        S_T = tl.load(states_ptr + here_T, mask=mask_T, other=0.0)  # (BV, BK)
        do_S += tl.dot(do, S_T, input_precision=PRECISION)
        dw -= tl.dot(du, S_T, input_precision=PRECISION)
        u_dS += tl.dot(u, tl.load(dstates_ptr + here_T, mask=mask_T, other=0.0), input_precision=PRECISION)
        S_dS += tl.sum(tl.load(states_ptr + here, mask=mask_kv, other=0.0) *
                       tl.load(dstates_ptr + here, mask=mask_kv, other=0.0), 1)

    # through the outputs O = diag(exp(gamma)) Q S + (causal decay * Q K^T) U
    decay = decay_matrix(gamma, same, False, L)
    dq_state = from_start[:, None] * do_S
    dq = dq_state + tl.dot(decay * do_u, _operand(k, k_ptr, tokens, valid, DK, BK, 1.0, False, RELOAD),
                           input_precision=PRECISION)
    if RELOAD:  # q as B operand here, as A operand after the store: two reads, not merged into one long-lived copy
        dk = tl.dot(_upper_decay(gamma, same, False, L) * u_do, _operand(q, q_ptr, tokens, valid, DK, BK, scale,
                                                                          False, RELOAD), input_precision=PRECISION)
    tl.store(dq_ptr + tokens[:, None] * DK + offs_k[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_k)
    qk = tl.dot(_operand(q, q_ptr, tokens, valid, DK, BK, scale, False, RELOAD),
                _operand(kT, k_ptr, tokens, valid, DK, BK, 1.0, True, RELOAD), input_precision=PRECISION)
    pairs = decay * do_u * qk  # d(loss)/d(gamma_t - gamma_s)
    dgamma = tl.sum(q * dq_state, 1) + tl.sum(pairs, 1) - tl.sum(pairs, 0)
    if not RELOAD:
        dk = tl.dot(_upper_decay(gamma, same, False, L) * u_do, q, input_precision=PRECISION)

    # through the end state S' = exp(gamma_L) S + (exp(gamma_L - gamma) K)^T U
    dk_end = (tl.exp(g_total - gamma) * to_end)[:, None] * u_dS
    dk += dk_end
    r = tl.sum(k * dk_end, 1)
    dgamma_total = tl.exp(g_total) * keeps * tl.sum(S_dS, 0) + tl.sum(r, 0)
    dgamma += tl.where(offs == L - 1, dgamma_total, 0.0) - r

    # through U = T diag(beta) V - T diag(beta exp(gamma)) K S, T = (I + M)^-1
    decay_strict = decay_matrix(gamma, same, True, L)
    decay_strict_T = _upper_decay(gamma, same, True, L)
    kk = tl.dot(_operand(k, k_ptr, tokens, valid, DK, BK, 1.0, False, RELOAD),
                _operand(kT, k_ptr, tokens, valid, DK, BK, 1.0, True, RELOAD), input_precision=PRECISION)  # symmetric
    inverse = unit_triangular_inverse(beta[:, None] * decay_strict * kk, L, LOG2_L, INVERSE_PRECISION)
    inverse_T = unit_triangular_inverse(beta[None, :] * decay_strict_T * kk, L, LOG2_L, INVERSE_PRECISION)
    dk_tilde = tl.dot(inverse_T, dw, input_precision=PRECISION)
    k_dk_tilde = tl.sum(k * dk_tilde, 1)
    dbeta = from_start * k_dk_tilde
    dk += (beta * from_start)[:, None] * dk_tilde
    dgamma += beta * from_start * k_dk_tilde

    # through M = diag(beta) (strict decay * K K^T): dM = -T^T dU U^T, dM^T = -U dU^T T
    dM = -tl.dot(inverse_T, du_u, input_precision=PRECISION)
    dM_T = -tl.dot(u_du, inverse, input_precision=PRECISION)
    dM_kk = dM * decay_strict * kk  # zero on and above the diagonal
    dbeta += tl.sum(dM_kk, 1)
    pairs = beta[:, None] * dM_kk
    dgamma += tl.sum(pairs, 1) - tl.sum(pairs, 0)
    k_again = _operand(k, k_ptr, tokens, valid, DK, BK, 1.0, False, RELOAD)
    dk += tl.dot(beta[:, None] * dM * decay_strict, k_again, input_precision=PRECISION)
    dk += tl.dot(beta[None, :] * dM_T * decay_strict_T, k_again, input_precision=PRECISION)
    tl.store(dk_ptr + tokens[:, None] * DK + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_k)

    # dV = diag(beta) T^T dU, one Dv-tile at a time
    for start in range(0, DV, BV):
        dv_tilde = tl.dot(inverse_T, load_rows(du_ptr, tokens, valid, DV, BV, start), input_precision=PRECISION)
        dbeta += tl.sum(load_rows(v_ptr, tokens, valid, DV, BV, start) * dv_tilde, 1)
        offs_v = start + tl.arange(0, BV)
        dv = (beta[:, None] * dv_tilde).to(dv_ptr.dtype.element_ty)
        tl.store(dv_ptr + tokens[:, None] * DV + offs_v[None, :], dv, mask=valid[:, None] & (offs_v < DV)[None, :])
    tl.store(dg_ptr + tokens, tl.cumsum(dgamma, 0, reverse=True), mask=valid)
    tl.store(dbeta_ptr + tokens, dbeta, mask=valid)


def delta_rule_backward(q, k, v, g, beta, starts, w, u, states, do, dS_T, scale: float, L: int, cfg):
    """Gradients of delta_rule_forward's (o, final state) with respect to q, k, v, g, beta and the initial state."""
    n, T, H, Dk, Dv, NC, BK, BV = sizes(q, v, L)
    precision, inverse_precision = precisions(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    dstates = torch.empty(n * H, NC, Dk, Dv, **f32)
    du = torch.empty(n, T, H, Dv, **f32)
    dS0 = torch.empty(n * H, Dk, Dv, **f32)
    documents = dict(HAS_STARTS=starts is not None)
    starts = g if starts is None else starts  # any tensor when HAS_STARTS is off: never read
    block_v = min(cfg.block_v_dstates, BV)
    launch(_dstates_kernel, (triton.cdiv(Dv, block_v), n * H),
        q, k, w, g, starts, do, dS_T, dstates, du, dS0, T, H, NC, Dk, Dv, scale, L=L, BK=BK, BV=block_v,
        PRECISION=precision, num_warps=cfg.warps_dstates, **stages(cfg.stages_dstates), **documents)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg, dbeta = torch.empty(n, T, H, **f32), torch.empty(n, T, H, **f32)
    launch(_grads_kernel, (NC, n * H),
        q, k, v, g, beta, starts, u, states, dstates, do, du, dq, dk, dv, dg, dbeta, T, H, NC, Dk, Dv, scale,
        L=L, LOG2_L=L.bit_length() - 1, BK=BK, BV=min(cfg.block_v_grads, BV), PRECISION=precision,
        INVERSE_PRECISION=inverse_precision, RELOAD=cfg.reload_grads, num_warps=cfg.warps_grads,
        num_stages=cfg.stages_grads, **documents)
    return dq, dk, dv, dg, dbeta, dS0


def stages(num_stages: int | None) -> dict:
    """The num_stages launch option, or none (Triton's default)."""
    return {} if num_stages is None else {"num_stages": num_stages}
