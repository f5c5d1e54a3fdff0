"""Triton sLSTM with each head split over P programs ("unit groups"), for head dims whose recurrent weights do not fit
one multiprocessor (bf16 d > 128, fp32 d > 64).

Program (batch block, head, p) owns the head's units [p U, (p + 1) U) for all four gates: it keeps the weight columns
R[g, h][:, its units] (four (D, U) tiles) on chip and computes the gate math, state and output of its units. Each step
needs the whole y_{t-1} of the head (forward) or the gate gradients of step t + 1 of every unit (backward), which the
P programs exchange through the buffers they write anyway (y, dL/draw), ordered by a barrier between the P programs
of a (batch block, head): a CTA barrier, an atomic counter increment with release semantics, a spin on the counter
with acquire semantics, a CTA barrier. All P programs must therefore run at the same time: `launch_groups` limits
each launch to as many programs as the GPU has multiprocessors.

Under TRITONINTERPRET=1 programs run one after another, so a spinning barrier would never return: there the kernels
run one time step per launch (`SYNC=False`), the launch boundary taking the barrier's place. Everything else (the
split, the exchange, the carried state) is the same code the GPU runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import INTERPRET
from .kernels import (
    _cell_step,
    _document_cell_grads,
    _load4,
    _matmul,
    _starts_at,
    _store4,
    _store_state,
    _weight_columns,
    weight_budget,
)


@triton.jit
def _group_barrier(counter_ptr, target):
    """Wait until the counter reaches `target` after adding this program's 1 (all P programs of the group)."""
    tl.debug_barrier()
    count = tl.atomic_add(counter_ptr, 1, sem="release") + 1
    while count < target:
        count = tl.atomic_add(counter_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _program_lanes(B, d, block_offset, D: tl.constexpr, BLOCK_B: tl.constexpr, U: tl.constexpr):
    """This program's batch rows (BLOCK_B, 1), its units (1, U) and all units of the head (1, D), with masks."""
    rows = ((block_offset + tl.program_id(0)) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None]
    units = tl.program_id(2) * U + tl.arange(0, U)[None, :]
    all_units = tl.arange(0, D)[None, :]
    return rows, units, (rows < B) & (units < d), all_units, (rows < B) & (all_units < d)


@triton.jit
def _split_forward_kernel(
    x_ptr, r_ptr, starts_ptr, raw_ptr, cnm_ptr, y_ptr, counter_ptr, B, T, H, d, block_offset, t_start, t_stop,
    D: tl.constexpr, BLOCK_B: tl.constexpr, U: tl.constexpr, P: tl.constexpr, DOT_BF16: tl.constexpr,
    SYNC: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """Steps t_start .. t_stop - 1. Layouts (and starts) as `kernels._slstm_forward_kernel`; the state entering
    t_start is read from cnm[:, t_start] and y[:, t_start]."""
    rows, units, mask, all_units, all_mask = _program_lanes(B, d, block_offset, D, BLOCK_B, U)
    h = tl.program_id(1)
    Hd = H * d
    x_row = x_ptr + rows * (T * 4 * Hd) + h * d + units
    raw_row = raw_ptr + rows * (T * 4 * Hd) + h * d + units
    cnm_row = cnm_ptr + rows * ((T + 1) * 3 * Hd) + h * d + units
    y_head = y_ptr + rows * ((T + 1) * Hd) + h * d
    w_i = _weight_columns(r_ptr, 0, h, H, d, units, D, False)
    w_f = _weight_columns(r_ptr, 1, h, H, d, units, D, False)
    w_z = _weight_columns(r_ptr, 2, h, H, d, units, D, False)
    w_o = _weight_columns(r_ptr, 3, h, H, d, units, D, False)
    c = tl.load(cnm_row + t_start * (3 * Hd), mask=mask, other=0.0)
    n = tl.load(cnm_row + t_start * (3 * Hd) + Hd, mask=mask, other=0.0)
    m = tl.load(cnm_row + t_start * (3 * Hd) + 2 * Hd, mask=mask, other=0.0)
    counter = counter_ptr + tl.program_id(0) * tl.num_programs(1) + h
    for t in range(t_start, t_stop):
        x_i, x_f, x_z, x_o = _load4(x_row + t * (4 * Hd), Hd, mask)
        y_prev = tl.load(y_head + t * Hd + all_units, mask=all_mask, other=0.0, cache_modifier=".cg")
        if HAS_STARTS:  # a start reads the zero state (the buffers keep the previous document's)
            start = _starts_at(starts_ptr, rows, B, T, t)
            y_prev = tl.where(start, 0.0, y_prev)
            c = tl.where(start, 0.0, c)
            n = tl.where(start, 0.0, n)
            m = tl.where(start, 0.0, m)
        i = x_i.to(tl.float32) + _matmul(y_prev, w_i, DOT_BF16)
        f = x_f.to(tl.float32) + _matmul(y_prev, w_f, DOT_BF16)
        z = x_z.to(tl.float32) + _matmul(y_prev, w_z, DOT_BF16)
        o = x_o.to(tl.float32) + _matmul(y_prev, w_o, DOT_BF16)
        _store4(raw_row + t * (4 * Hd), Hd, i, f, z, o, mask)
        c, n, m, y = _cell_step(i, f, z, o, c, n, m, mask)
        _store_state(cnm_row + (t + 1) * (3 * Hd), Hd, c, n, m, mask)
        tl.store(y_head + (t + 1) * Hd + units, y, mask=mask)
        if SYNC:
            _group_barrier(counter, P * (t - t_start + 1))


@triton.jit
def _split_backward_kernel(
    r_ptr, starts_ptr, raw_ptr, cnm_ptr, gy_ptr, graw_ptr, gstate_ptr, counter_ptr, B, T, H, d, block_offset, t_low,
    t_high, D: tl.constexpr, BLOCK_B: tl.constexpr, U: tl.constexpr, P: tl.constexpr, DOT_BF16: tl.constexpr,
    SYNC: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """Steps t_high - 1 down to t_low. gstate (3, B, H, d) holds dL/d(c, n, m) of the state after step t_high - 1
    on entry and of the state before step t_low on exit; graw (B, T, 4, H, d) must hold the gate gradients of step
    t_high (if t_high < T)."""
    rows, units, mask, all_units, all_mask = _program_lanes(B, d, block_offset, D, BLOCK_B, U)
    h = tl.program_id(1)
    Hd = H * d
    raw_row = raw_ptr + rows * (T * 4 * Hd) + h * d + units
    graw_row = graw_ptr + rows * (T * 4 * Hd) + h * d + units
    graw_head = graw_ptr + rows * (T * 4 * Hd) + h * d + all_units
    cnm_row = cnm_ptr + rows * ((T + 1) * 3 * Hd) + h * d + units
    gy_row = gy_ptr + rows * (T * Hd) + h * d + units
    state_at = rows * Hd + h * d + units
    BHd = B * Hd
    g_c = tl.load(gstate_ptr + state_at, mask=mask, other=0.0)
    g_n = tl.load(gstate_ptr + BHd + state_at, mask=mask, other=0.0)
    g_m = tl.load(gstate_ptr + 2 * BHd + state_at, mask=mask, other=0.0)
    wt_i = _weight_columns(r_ptr, 0, h, H, d, units, D, True)
    wt_f = _weight_columns(r_ptr, 1, h, H, d, units, D, True)
    wt_z = _weight_columns(r_ptr, 2, h, H, d, units, D, True)
    wt_o = _weight_columns(r_ptr, 3, h, H, d, units, D, True)
    counter = counter_ptr + tl.program_id(0) * tl.num_programs(1) + h
    for k in range(0, t_high - t_low):
        t = t_high - 1 - k
        # dL/dy_t through step t + 1's gates (every unit's gradients, written by all P programs)
        g_y = tl.load(gy_row + t * Hd, mask=mask, other=0.0)
        if t + 1 < T:
            g_next = graw_head + (t + 1) * (4 * Hd)
            g_rec = _matmul(tl.load(g_next, mask=all_mask, other=0.0, cache_modifier=".cg"), wt_i, DOT_BF16)
            g_rec += _matmul(tl.load(g_next + Hd, mask=all_mask, other=0.0, cache_modifier=".cg"), wt_f, DOT_BF16)
            g_rec += _matmul(tl.load(g_next + 2 * Hd, mask=all_mask, other=0.0, cache_modifier=".cg"), wt_z,
                             DOT_BF16)
            g_rec += _matmul(tl.load(g_next + 3 * Hd, mask=all_mask, other=0.0, cache_modifier=".cg"), wt_o,
                             DOT_BF16)
            if HAS_STARTS:  # none where step t + 1 started a document (it read y = 0)
                g_rec = tl.where(_starts_at(starts_ptr, rows, B, T, t + 1), 0.0, g_rec)
            g_y += g_rec
        i, f, z, o = _load4(raw_row + t * (4 * Hd), Hd, mask)
        cnm_prev = cnm_row + t * (3 * Hd)
        c_prev = tl.load(cnm_prev, mask=mask, other=0.0)
        n_prev = tl.load(cnm_prev + Hd, mask=mask, other=1.0)
        m_prev = tl.load(cnm_prev + 2 * Hd, mask=mask, other=0.0)
        c = tl.load(cnm_prev + 3 * Hd, mask=mask, other=0.0)
        n = tl.load(cnm_prev + 4 * Hd, mask=mask, other=1.0)
        m = tl.load(cnm_prev + 5 * Hd, mask=mask, other=0.0)
        g_i, g_f, g_z, g_o, g_c, g_n, g_m = _document_cell_grads(
            i, f, z, o, c_prev, n_prev, m_prev, c, n, m, g_y, g_c, g_n, g_m, mask, starts_ptr, rows, B, T, t, HAS_STARTS
        )  # fmt: skip
        _store4(graw_row + t * (4 * Hd), Hd, g_i, g_f, g_z, g_o, mask)
        if SYNC:
            _group_barrier(counter, P * (k + 1))
    _store_state(gstate_ptr + state_at, BHd, g_c, g_n, g_m, mask)


def split_units(D: int, dot_bf16: bool) -> int:
    """Units per group U (P = D // U groups per head): 32 (measured best on an H100 at d = 128 and 192, bf16:
    19.9 / 24.3 ms vs 24.7 / 29.3 ms with 64), halved while the four (D, U) weight tiles exceed `weight_budget`."""
    units = min(D, 32)
    while units > 16 and 4 * D * units * (2 if dot_bf16 else 4) > weight_budget(dot_bf16):
        units //= 2
    return units


def launch_groups(blocks: int, H: int, P: int, device: torch.device) -> list[tuple[int, int]]:
    """(first batch block, number of blocks) per launch, so that every launch's programs run at once (one per
    multiprocessor at most: each holds up to 128 KB of weights)."""
    if INTERPRET or device.type != "cuda":
        return [(0, blocks)]
    per_launch = max(1, torch.cuda.get_device_properties(device).multi_processor_count // (H * P))
    return [(start, min(per_launch, blocks - start)) for start in range(0, blocks, per_launch)]


def split_forward(x, r_dot, starts, raw, cnm, y_all, D, BLOCK_B, U, dot_bf16, num_warps):
    """starts: (B, T) int8, or None (no document starts)."""
    B, T, _, H, d = x.shape
    P = D // U
    blocks = triton.cdiv(B, BLOCK_B)
    for first, count in launch_groups(blocks, H, P, x.device):
        steps = [(t, t + 1) for t in range(T)] if INTERPRET else [(0, T)]
        for t_start, t_stop in steps:
            counters = torch.zeros(count, H, dtype=torch.int32, device=x.device)
            _split_forward_kernel[(count, H, P)](
                x, r_dot, r_dot if starts is None else starts, raw, cnm, y_all, counters, B, T, H, d, first,
                t_start, t_stop, D=D, BLOCK_B=BLOCK_B, U=U, P=P, DOT_BF16=dot_bf16, SYNC=not INTERPRET,
                HAS_STARTS=starts is not None, num_warps=num_warps, num_stages=1,
            )  # fmt: skip


def split_backward(r_dot, starts, raw, cnm, gy, graw, gstate, D, BLOCK_B, U, dot_bf16, num_warps):
    """gstate (3, B, H, d): dL/d(c_T, n_T, m_T) in, dL/d(c_0, n_0, m_0) out. Fills graw. starts as
    `split_forward`."""
    B, T, _, H, d = raw.shape
    P = D // U
    blocks = triton.cdiv(B, BLOCK_B)
    for first, count in launch_groups(blocks, H, P, raw.device):
        steps = [(t, t + 1) for t in reversed(range(T))] if INTERPRET else [(0, T)]
        for t_low, t_high in steps:
            counters = torch.zeros(count, H, dtype=torch.int32, device=raw.device)
            _split_backward_kernel[(count, H, P)](
                r_dot, r_dot if starts is None else starts, raw, cnm, gy, graw, gstate, counters, B, T, H, d,
                first, t_low, t_high, D=D, BLOCK_B=BLOCK_B, U=U, P=P, DOT_BF16=dot_bf16, SYNC=not INTERPRET,
                HAS_STARTS=starts is not None, num_warps=num_warps, num_stages=1,
            )  # fmt: skip
