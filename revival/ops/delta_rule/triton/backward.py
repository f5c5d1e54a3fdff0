"""Chunkwise gated delta rule backward in Triton: four kernels (notation of forward.py; per chunk, S the entering
state, dS' the gradient of the state at its end, T = (I + M)^-1, which the forward's `_wy_kernel` kept with
A = strict decay * K K^T, M = diag(beta) A, in a (n*H, NC, 2, L, L) buffer).

0. `_local_du_kernel`, every (chunk, batch*head, Dv-tile): the part of the gradient of U through the chunk's own
   outputs, (causal decay * Q K^T)^T dO, into dU (it does not depend on dS', so it leaves the sequential walk).
1. `_dstates_kernel`, one program per (Dv-tile, batch*head) walking the chunks backwards: adds the part through the
   end state, dU += diag(exp(gamma_L - gamma)) K dS', and
   dS <- exp(gamma_L) dS' + (exp(gamma) Q)^T dO - W^T dU; what is left is the initial state's gradient. Per chunk two
   (L, Dk) x (Dk, BV) / (Dk, L) x (L, BV) products hang on dS (K dS', W^T dU), one does not ((exp(gamma) Q)^T dO).
2. `_output_grads_kernel`, every (chunk, batch*head): dQ and the parts of dK, dg through the outputs and the end
   state (float32 scratch).
3. `_wy_grads_kernel`, every (chunk, batch*head): the parts through U = U0 - W S, added to 2.'s: dK, dV, dg, dbeta.
   With U = U0 - W S the gradient of M simplifies to dM = -T^T dU U^T (and its transpose -U dU^T T); T^T is read
   transposed from the forward's buffer and no computed tile is ever transposed (`tl.trans` of a matrix-unit
   result feeding another product is the pattern behind fla #640).
Why 2.-3., not one gradient kernel: one held 4 (L, L) and 3 (L, Dk) float32 accumulators over its Dv loop plus both
inverses' squarings, and spilled ~5 KB per thread on sm_90 (benchmarks/results/delta_rule_compile_split.json).
Log-decay gradients: each (t, s) pair's exp(gamma_t - gamma_s) gives +row sum -column sum, the entering state
exp(gamma_t) and exp(gamma_L), W's exp(gamma_t), then dg = reverse cumsum over the chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import wide_block_v
from .forward import (
    LENGTHS,
    chunk_tokens,
    decay_matrix,
    document_masks,
    initial_state,
    launch,
    load_cols,
    load_decay,
    load_gates,
    load_rows,
    product_precision,
    segmented_walk,
    sizes,
    store_state,
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
def _local_du_kernel(
    q_ptr, k_ptr, g_ptr, starts_ptr, do_ptr, du_ptr,
    T, H, DK, DV, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    """Every (chunk, batch*head, Dv-tile): the part of dU through the chunk's own outputs, (causal decay *
    Q K^T)^T dO, which does not depend on the state gradient (the walk adds the rest in place)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    iv = tl.program_id(2)
    tokens, valid = chunk_tokens(row, c, T, H, L)
    gamma, _ = load_decay(g_ptr, tokens, valid)
    same, _, _, _ = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    k = load_rows(k_ptr, tokens, valid, DK, BK, 0)
    qT = load_cols(q_ptr, tokens, valid, DK, BK, 0) * scale
    scores_T = tl.dot(k, qT, input_precision=PRECISION) * _upper_decay(gamma, same, False, L)  # [s, t]
    u_offs, mask_u = value_tile(tokens, valid, iv, DV, BV)
    do = tl.load(do_ptr + u_offs, mask=mask_u, other=0.0).to(tl.float32)
    tl.store(du_ptr + u_offs, tl.dot(scores_T, do, input_precision=PRECISION), mask=mask_u)


@triton.jit(do_not_specialize=LENGTHS + ("SPAN",))
def _dstates_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, starts_ptr, do_ptr, scale, ds_first_ptr,
    dstates_ptr, du_ptr, ds_last_ptr,
    T, H, NC, SPAN, DK, DV, WIDTH,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    WALK: tl.constexpr, FIRST_SEGMENT: tl.constexpr,
):
    """One (column tile, batch*head, segment) walking the segment's chunks backwards (the forward's
    `_states_kernel` in reverse, its WALK modes "full" and "local" and segments; the transitions come from the
    forward). du_ptr holds `_local_du_kernel`'s part of dU on entry; "full" adds the rest in place and stores each
    chunk's dS', and the initial state's gradient once the first segment is done."""
    iv = tl.program_id(0)
    row = tl.program_id(1)
    segment = FIRST_SEGMENT + tl.program_id(2)
    index = segment * tl.num_programs(1) + row
    dS = initial_state(ds_first_ptr, index, DK, WIDTH, BK, BV, iv, "load" if WALK == "full" else "zeros")
    first = segment * SPAN
    for cc in range(0, tl.minimum(NC, first + SPAN) - first):
        c = tl.minimum(NC, first + SPAN) - 1 - cc
        if WALK == "full":
            store_state(dstates_ptr, dS, row, c, NC, DK, DV, BK, BV, iv)
        tokens, valid = chunk_tokens(row, c, T, H, L)
        gamma, g_total = load_decay(g_ptr, tokens, valid)
        _, from_state, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
        u_offs, mask_u = value_tile(tokens, valid, iv, DV, BV)
        # the tokens' scalings on the (L, BV) sides of the products: k, q go to the matrix units as loaded
        k_dS = tl.dot(load_rows(k_ptr, tokens, valid, DK, BK, 0), dS, input_precision=PRECISION)
        du = tl.load(du_ptr + u_offs, mask=mask_u, other=0.0) + (tl.exp(g_total - gamma) * to_end)[:, None] * k_dS
        if WALK == "full":
            tl.store(du_ptr + u_offs, du, mask=mask_u)
        do_from_state = tl.load(do_ptr + u_offs, mask=mask_u, other=0.0).to(tl.float32) * (
            scale * tl.exp(gamma) * from_state)[:, None]
        dS = tl.exp(g_total) * keeps * dS + tl.dot(load_cols(q_ptr, tokens, valid, DK, BK, 0), do_from_state,
                                                   input_precision=PRECISION)
        dS -= tl.dot(load_cols(w_ptr, tokens, valid, DK, BK, 0), du, input_precision=PRECISION)
    if WALK == "full":
        if segment == 0:
            store_state(ds_last_ptr, dS, row, 0, 1, DK, DV, BK, BV, iv)
    else:
        store_state(ds_last_ptr, dS, index, 0, 1, DK, WIDTH, BK, BV, iv)


@triton.jit(do_not_specialize=LENGTHS)
def _output_grads_kernel(
    q_ptr, k_ptr, g_ptr, starts_ptr, u_ptr, states_ptr, dstates_ptr, do_ptr,
    dq_ptr, dk_out_ptr, dg_out_ptr,
    T, H, NC, DK, DV, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    """dQ, and the parts of dK and dg through the outputs and the end state (float32: `_wy_grads_kernel` adds the
    rest). dg is stored summed (a masked tail chunk would drop dgamma_total at L - 1)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    tokens, valid = chunk_tokens(row, c, T, H, L)
    gamma, g_total = load_decay(g_ptr, tokens, valid)
    offs = tl.arange(0, L)
    same, from_state, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    offs_k = tl.arange(0, BK)
    mask_k = valid[:, None] & (offs_k < DK)[None, :]
    base = (row.to(tl.int64) * NC + c) * DK * DV

    # the sums over Dv, one Dv-tile at a time (BV wide): products of dO with U and the state, of U with the end
    # state's gradient
    do_u = tl.zeros((L, L), tl.float32)  # [t, s] = dO_t . U_s
    u_do = tl.zeros((L, L), tl.float32)  # [s, t]
    do_S = tl.zeros((L, BK), tl.float32)  # dO S^T
    u_dS = tl.zeros((L, BK), tl.float32)  # U dS'^T
    S_dS = tl.zeros((BK,), tl.float32)  # row sums of S * dS'
    for start in range(0, DV, BV):
        u = load_rows(u_ptr, tokens, valid, DV, BV, start)
        do = load_rows(do_ptr, tokens, valid, DV, BV, start)
        do_u += tl.dot(do, load_cols(u_ptr, tokens, valid, DV, BV, start), input_precision=PRECISION)
        u_do += tl.dot(u, load_cols(do_ptr, tokens, valid, DV, BV, start), input_precision=PRECISION)
        offs_v = start + tl.arange(0, BV)
        here = base + offs_k[:, None] * DV + offs_v[None, :]
        mask_kv = (offs_k < DK)[:, None] & (offs_v < DV)[None, :]
        here_T = base + offs_k[None, :] * DV + offs_v[:, None]
        mask_T = (offs_v < DV)[:, None] & (offs_k < DK)[None, :]
        do_S += tl.dot(do, tl.load(states_ptr + here_T, mask=mask_T, other=0.0), input_precision=PRECISION)
        u_dS += tl.dot(u, tl.load(dstates_ptr + here_T, mask=mask_T, other=0.0), input_precision=PRECISION)
        S_dS += tl.sum(tl.load(states_ptr + here, mask=mask_kv, other=0.0) *
                       tl.load(dstates_ptr + here, mask=mask_kv, other=0.0), 1)

    # through the end state S' = exp(gamma_L) S + (exp(gamma_L - gamma) K)^T U, first: U dS'^T's last use; q, k are
    # read after the loop (not held through it)
    k = load_rows(k_ptr, tokens, valid, DK, BK, 0)
    dk = (tl.exp(g_total - gamma) * to_end)[:, None] * u_dS
    r = tl.sum(k * dk, 1)
    dgamma = tl.where(offs == L - 1, tl.exp(g_total) * keeps * tl.sum(S_dS, 0) + tl.sum(r, 0), 0.0) - r

    # through the outputs O = diag(exp(gamma)) Q S + (causal decay * Q K^T) U
    q = load_rows(q_ptr, tokens, valid, DK, BK, 0) * scale
    decay = decay_matrix(gamma, same, False, L)
    dq_state = (tl.exp(gamma) * from_state)[:, None] * do_S
    dgamma += tl.sum(q * dq_state, 1)
    dq = dq_state + tl.dot(decay * do_u, k, input_precision=PRECISION)
    dk += tl.dot(_upper_decay(gamma, same, False, L) * u_do, q, input_precision=PRECISION)
    tl.store(dq_ptr + tokens[:, None] * DK + offs_k[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_k)
    qk = tl.dot(q, load_cols(k_ptr, tokens, valid, DK, BK, 0), input_precision=PRECISION)
    pairs = decay * do_u * qk  # d(loss)/d(gamma_t - gamma_s)
    dgamma += tl.sum(pairs, 1) - tl.sum(pairs, 0)
    tl.store(dk_out_ptr + tokens[:, None] * DK + offs_k[None, :], dk, mask=mask_k)
    tl.store(dg_out_ptr + tokens, tl.cumsum(dgamma, 0, reverse=True), mask=valid)


@triton.jit(do_not_specialize=LENGTHS)
def _wy_grads_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, starts_ptr, u_ptr, states_ptr, du_ptr, inverse_ptr, dk_out_ptr, dg_out_ptr,
    dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,
    T, H, NC, DK, DV,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    """The parts through U = U0 - W S (dK's rest, dV, dbeta, dg's rest), added to `_output_grads_kernel`'s float32
    dK and dg (dk_out, dg_out); stores dK, dV, dg and dbeta. With T^T read first, one Dv loop forms dV~ = T^T dU
    and from it dM = -dV~ U^T and dK~ = T^T dW = -dV~ S^T (no (L, L) dU U^T or (L, Dk) dW accumulated)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    tokens, valid = chunk_tokens(row, c, T, H, L)
    gamma, _, beta = load_gates(g_ptr, beta_ptr, tokens, valid)
    same, from_state, _, _ = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    from_start = tl.exp(gamma) * from_state  # how the entering state reaches each token
    offs = tl.arange(0, L)
    offs_k = tl.arange(0, BK)
    mask_k = valid[:, None] & (offs_k < DK)[None, :]
    base = (row.to(tl.int64) * NC + c) * DK * DV
    inverse_base = inverse_ptr + (row.to(tl.int64) * NC + c) * 2 * L * L  # T, then A

    # U = T diag(beta) V - T diag(beta exp(gamma)) K S, T = (I + M)^-1, M = diag(beta) (strict decay * K K^T).
    # The sums over Dv, one Dv-tile at a time (BV wide): dV = diag(beta) dV~, dM and dK~ from dV~; U dU^T for
    # dM^T = -U dU^T T after the loop
    inverse_T = tl.load(inverse_base + offs[None, :] * L + offs[:, None])
    dM = tl.zeros((L, L), tl.float32)
    u_du = tl.zeros((L, L), tl.float32)  # [s, t] = U_s . dU_t
    dk_tilde = tl.zeros((L, BK), tl.float32)
    dbeta = tl.zeros((L,), tl.float32)
    for start in range(0, DV, BV):
        dv_tilde = tl.dot(inverse_T, load_rows(du_ptr, tokens, valid, DV, BV, start), input_precision=PRECISION)
        dbeta += tl.sum(load_rows(v_ptr, tokens, valid, DV, BV, start) * dv_tilde, 1)
        offs_v = start + tl.arange(0, BV)
        dv = (beta[:, None] * dv_tilde).to(dv_ptr.dtype.element_ty)
        tl.store(dv_ptr + tokens[:, None] * DV + offs_v[None, :], dv, mask=valid[:, None] & (offs_v < DV)[None, :])
        # -dV~ into both accumulators in place (Triton fuses acc + dot, not acc - dot: a (L, L) and an (L, Dk)
        # float32 temporary less; sm_90 bf16 probe: 36 -> 0 spill bytes)
        dM = tl.dot(-dv_tilde, load_cols(u_ptr, tokens, valid, DV, BV, start), acc=dM, input_precision=PRECISION)
        here_T = base + offs_k[None, :] * DV + offs_v[:, None]
        mask_T = (offs_v < DV)[:, None] & (offs_k < DK)[None, :]
        dk_tilde = tl.dot(-dv_tilde, tl.load(states_ptr + here_T, mask=mask_T, other=0.0), acc=dk_tilde,
                          input_precision=PRECISION)
        u_du += tl.dot(load_rows(u_ptr, tokens, valid, DV, BV, start), load_cols(du_ptr, tokens, valid, DV, BV, start),
                       input_precision=PRECISION)

    # dM^T = -U dU^T T (U dU^T's last use)
    dM_T = -tl.dot(u_du, tl.load(inverse_base + offs[:, None] * L + offs[None, :]), input_precision=PRECISION)

    # through W = T diag(beta exp(gamma)) K (dK~'s last use first)
    k = load_rows(k_ptr, tokens, valid, DK, BK, 0)
    k_dk_tilde = tl.sum(k * dk_tilde, 1)
    dbeta += from_start * k_dk_tilde
    dgamma = beta * from_start * k_dk_tilde
    dk = (beta * from_start)[:, None] * dk_tilde

    # through M = diag(beta) (strict decay * K K^T)
    decay_strict = decay_matrix(gamma, same, True, L)
    dM_kk = dM * tl.load(inverse_base + L * L + offs[:, None] * L + offs[None, :])  # zero on and above the diagonal
    dbeta += tl.sum(dM_kk, 1)
    pairs = beta[:, None] * dM_kk
    dgamma += tl.sum(pairs, 1) - tl.sum(pairs, 0)
    dk += tl.dot(beta[:, None] * dM * decay_strict, k, input_precision=PRECISION)
    dk += tl.dot(beta[None, :] * dM_T * _upper_decay(gamma, same, True, L), k, input_precision=PRECISION)
    dk += tl.load(dk_out_ptr + tokens[:, None] * DK + offs_k[None, :], mask=mask_k, other=0.0)
    tl.store(dk_ptr + tokens[:, None] * DK + offs_k[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_k)
    dg = tl.load(dg_out_ptr + tokens, mask=valid, other=0.0) + tl.cumsum(dgamma, 0, reverse=True)
    tl.store(dg_ptr + tokens, dg, mask=valid)
    tl.store(dbeta_ptr + tokens, dbeta, mask=valid)


def delta_rule_backward(q, k, v, g, beta, starts, w, u, states, inverse, transitions, do, dS_T, scale: float, L: int,
                        cfg):
    """Gradients of delta_rule_forward's (o, final state) with respect to q, k, v, g, beta and the initial state."""
    n, T, H, Dk, Dv, NC, BK, BV = sizes(q, v, L)
    precision = product_precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    dstates = torch.empty(n * H, NC, Dk, Dv, **f32)
    du = torch.empty(n, T, H, Dv, **f32)
    dS0 = torch.empty(n * H, Dk, Dv, **f32)
    documents = dict(HAS_STARTS=starts is not None)
    starts = g if starts is None else starts  # any tensor when HAS_STARTS is off: never read
    block_v = min(cfg.block_v_du, BV)
    launch(_local_du_kernel, (NC, n * H, triton.cdiv(Dv, block_v)),
        q, k, g, starts, do, du, T, H, Dk, Dv, scale, L=L, BK=BK, BV=block_v, PRECISION=precision,
        num_warps=cfg.warps_du, **documents)
    walk = dict(L=L, BK=BK, BV=wide_block_v(cfg.block_v_dstates, BV), PRECISION=precision,
                num_warps=cfg.warps_dstates, **stages(cfg.stages_dstates), **documents)
    segmented_walk(_dstates_kernel, (q, k, w, g, starts, do, scale), dS_T, (dstates, du), dS0, (T, H, NC), (Dk, Dv),
                   n * H, cfg.segments, walk, transitions=transitions, reverse=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dk_out, dg_out = torch.empty(n, T, H, Dk, **f32), torch.empty(n, T, H, **f32)  # the first kernel's parts
    dg, dbeta = torch.empty(n, T, H, **f32), torch.empty(n, T, H, **f32)
    grads = dict(L=L, BK=BK, PRECISION=precision, BV=wide_block_v(cfg.block_v_grads, BV), num_warps=cfg.warps_grads,
                 num_stages=cfg.stages_grads, **documents)
    launch(_output_grads_kernel, (NC, n * H),
        q, k, g, starts, u, states, dstates, do, dq, dk_out, dg_out, T, H, NC, Dk, Dv, scale, **grads)
    launch(_wy_grads_kernel, (NC, n * H),
        k, v, g, beta, starts, u, states, du, inverse, dk_out, dg_out, dk, dv, dg, dbeta, T, H, NC, Dk, Dv, **grads)
    return dq, dk, dv, dg, dbeta, dS0


def stages(num_stages: int | None) -> dict:
    """The num_stages launch option, or none (Triton's default)."""
    return {} if num_stages is None else {"num_stages": num_stages}
