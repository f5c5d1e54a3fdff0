"""Triton sLSTM kernels of the resident and streamed weight modes, and the cell helpers the split kernels share
(`split.py`). Launched by `__init__.py` (the autograd Function and the launch config); design notes there."""

from __future__ import annotations

import triton
import triton.language as tl

from ..._triton import INTERPRET

_FP32_PRODUCTS = tl.constexpr("ieee" if INTERPRET else "tf32x3")


@triton.jit
def _weight_columns(r_ptr, g, h, H, d, units, D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """(D, U) tile: R[g, h][:, units] (TRANSPOSE: R[g, h][units, :]^T), zero padded."""
    k = tl.arange(0, D)[:, None]
    mask = (k < d) & (units < d)
    base = r_ptr + (g * H + h) * d * d
    if TRANSPOSE:
        return tl.load(base + units * d + k, mask=mask, other=0.0)
    return tl.load(base + k * d + units, mask=mask, other=0.0)


@triton.jit
def _weight_tile(r_ptr, g, h, H, d, D: tl.constexpr, TRANSPOSE: tl.constexpr):
    """R[g, h] as a (D, D) tile (zero padded); transposed if TRANSPOSE."""
    return _weight_columns(r_ptr, g, h, H, d, tl.arange(0, D)[None, :], D, TRANSPOSE)


@triton.jit
def _matmul(a, w, DOT_BF16: tl.constexpr):
    """a (BLOCK_B, D) float32 @ w (D, D) -> float32. Float32 products: three TF32 tensor-core products with
    split operands on the GPU ("tf32x3", float32-level accuracy, ~10x faster than CUDA-core "ieee" products
    here); exact float32 under the interpreter, which has no tf32x3."""
    if DOT_BF16:
        return tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16))
    return tl.dot(a, w.to(tl.float32), input_precision=_FP32_PRODUCTS)

@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))

@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0

@triton.jit
def _load4(ptr, stride, mask):
    """The four gate slices at ptr, ptr + stride, ... (zero outside mask)."""
    return (tl.load(ptr, mask=mask, other=0.0), tl.load(ptr + stride, mask=mask, other=0.0),
            tl.load(ptr + 2 * stride, mask=mask, other=0.0), tl.load(ptr + 3 * stride, mask=mask, other=0.0))

@triton.jit
def _store4(ptr, stride, a, b, c, d, mask):
    tl.store(ptr, a, mask=mask)
    tl.store(ptr + stride, b, mask=mask)
    tl.store(ptr + 2 * stride, c, mask=mask)
    tl.store(ptr + 3 * stride, d, mask=mask)

@triton.jit
def _store_state(ptr, stride, c, n, m, mask):
    tl.store(ptr, c, mask=mask)
    tl.store(ptr + stride, n, mask=mask)
    tl.store(ptr + 2 * stride, m, mask=mask)

@triton.jit
def _starts_at(starts_ptr, rows, B, T, t):
    """(BLOCK_B, 1) bool: the rows whose document starts at step t (starts (B, T) int8)."""
    return tl.load(starts_ptr + rows * T + t, mask=rows < B, other=0) != 0

@triton.jit
def _head_lanes(B, d, D: tl.constexpr, BLOCK_B: tl.constexpr):
    """This program's batch rows (BLOCK_B, 1) and the head's units (1, D), with their mask."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None]
    units = tl.arange(0, D)[None, :]
    return rows, units, (rows < B) & (units < d)


@triton.jit
def _cell_step(i, f, z, o, c, n, m, mask):
    """One step from the pre-activations (float32): the new (c, n, m, y); y is 0 outside `mask`. Per unit, the
    first step (n == 0) sets m = i and ignores the forget gate (docs/math.md "sLSTM")."""
    log_fm = m + _log_sigmoid(f)
    first = n == 0.0
    m_new = tl.where(first | (i >= log_fm), i, log_fm)
    i_bar = tl.exp(i - m_new)
    f_bar = tl.where(first, 0.0, tl.exp(log_fm - m_new))
    c_new = f_bar * c + i_bar * _tanh(z)
    n_new = f_bar * n + i_bar
    y = tl.where(mask, tl.sigmoid(o) * c_new / n_new, 0.0)
    return c_new, n_new, m_new, y

@triton.jit
def _cell_grads(i, f, z, o, c_prev, n_prev, m_prev, c, n, m, g_y, g_c, g_n, g_m, mask):
    """One step backward. Inputs: the step's pre-activations, the state before and after it, dL/dy_t and the
    carried dL/d(c_t, n_t, m_t). Returns dL/d(i, f, z, o) of the step (0 outside `mask`) and dL/d(c, n, m) of
    the state before it."""
    log_fm = m_prev + _log_sigmoid(f)
    first = n_prev == 0.0
    picked_i = first | (i >= log_fm)
    i_bar = tl.exp(i - m)
    f_bar = tl.where(first, 0.0, tl.exp(log_fm - m))
    tanh_z = _tanh(z)
    sig_o = tl.sigmoid(o)
    g_c += g_y * sig_o / n
    g_n -= g_y * sig_o * c / (n * n)
    g_o = tl.where(mask, g_y * (c / n) * sig_o * (1.0 - sig_o), 0.0)
    g_z = tl.where(mask, g_c * i_bar * (1.0 - tanh_z * tanh_z), 0.0)
    via_i = (g_c * tanh_z + g_n) * i_bar
    via_f = (g_c * c_prev + g_n * n_prev) * f_bar
    via_m = g_m - via_i - via_f  # dL/dm_t through every use, routed to i or log_fm
    g_i = tl.where(mask, via_i + tl.where(picked_i, via_m, 0.0), 0.0)
    g_log_fm = tl.where(mask, via_f + tl.where(picked_i, 0.0, via_m), 0.0)
    g_f = g_log_fm * tl.sigmoid(-f)
    return g_i, g_f, g_z, g_o, tl.where(mask, g_c * f_bar, 0.0), tl.where(mask, g_n * f_bar, 0.0), g_log_fm

@triton.jit
def _document_cell_grads(i, f, z, o, c_prev, n_prev, m_prev, c, n, m, g_y, g_c, g_n, g_m, mask,
                         starts_ptr, rows, B, T, t, HAS_STARTS: tl.constexpr):
    """`_cell_grads` of step t; where t starts a document (HAS_STARTS) the step read the zero state and passes the
    state before it no gradient."""
    if HAS_STARTS:
        start = _starts_at(starts_ptr, rows, B, T, t)
        c_prev = tl.where(start, 0.0, c_prev)
        n_prev = tl.where(start, 0.0, n_prev)
        m_prev = tl.where(start, 0.0, m_prev)
    g_i, g_f, g_z, g_o, g_c, g_n, g_m = _cell_grads(
        i, f, z, o, c_prev, n_prev, m_prev, c, n, m, g_y, g_c, g_n, g_m, mask
    )  # fmt: skip
    if HAS_STARTS:
        g_c = tl.where(start, 0.0, g_c)
        g_n = tl.where(start, 0.0, g_n)
        g_m = tl.where(start, 0.0, g_m)
    return g_i, g_f, g_z, g_o, g_c, g_n, g_m


@triton.jit
def _streamed_matmul(a_ptr, a_stride, r_ptr, g, h, H, d, rows, B,
                     D: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSE: tl.constexpr, DOT_BF16: tl.constexpr):
    """sum_k a[:, k] R[g, h][k, :] (TRANSPOSE: R[g, h][:, k]) with a (BLOCK_B, d) float32 read from global memory
    at a_ptr (rows of stride a_stride, d contiguous columns) and R read in (BLOCK_K, D) slices."""
    acc = tl.zeros((rows.shape[0], D), dtype=tl.float32)
    cols = tl.arange(0, D)[None, :]
    base = r_ptr + (g * H + h) * d * d
    for k0 in tl.static_range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows * a_stride + ks[None, :], mask=(rows < B) & (ks[None, :] < d), other=0.0)
        w_mask = (ks[:, None] < d) & (cols < d)
        if TRANSPOSE:
            w = tl.load(base + cols * d + ks[:, None], mask=w_mask, other=0.0)
        else:
            w = tl.load(base + ks[:, None] * d + cols, mask=w_mask, other=0.0)
        acc += _matmul(a, w, DOT_BF16)
    return acc

@triton.jit
def _slstm_forward_kernel(
    x_ptr, r_ptr, starts_ptr, raw_ptr, cnm_ptr, y_ptr, B, T, H, d,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
    DOT_BF16: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """x (B, T, 4, H, d) any float; raw (B, T, 4, H, d) f32 out; cnm (B, T+1, 3, H, d) f32 and y (B, T+1, H, d)
    f32 with index 0 holding the initial state, indices 1..T written here. starts (B, T) int8 (HAS_STARTS): the
    state (c, n, m, y) entering a start is taken as zero (cnm and y keep the previous document's values)."""
    h = tl.program_id(1)
    rows, units, mask = _head_lanes(B, d, D, BLOCK_B)
    Hd = H * d
    x_row = x_ptr + rows * (T * 4 * Hd) + h * d + units
    raw_row = raw_ptr + rows * (T * 4 * Hd) + h * d + units
    cnm_row = cnm_ptr + rows * ((T + 1) * 3 * Hd) + h * d + units
    y_row = y_ptr + rows * ((T + 1) * Hd) + h * d + units
    c = tl.load(cnm_row, mask=mask, other=0.0)
    n = tl.load(cnm_row + Hd, mask=mask, other=0.0)
    m = tl.load(cnm_row + 2 * Hd, mask=mask, other=0.0)
    y = tl.load(y_row, mask=mask, other=0.0)
    if RESIDENT:
        w_i = _weight_tile(r_ptr, 0, h, H, d, D, False)
        w_f = _weight_tile(r_ptr, 1, h, H, d, D, False)
        w_z = _weight_tile(r_ptr, 2, h, H, d, D, False)
        w_o = _weight_tile(r_ptr, 3, h, H, d, D, False)
    y_stride = (T + 1) * Hd
    x_i, x_f, x_z, x_o = _load4(x_row, Hd, mask)
    for t in range(0, T):
        i = x_i.to(tl.float32)
        f = x_f.to(tl.float32)
        z = x_z.to(tl.float32)
        o = x_o.to(tl.float32)
        # prefetch: the next step's inputs do not depend on this step, so their loads overlap its math
        x_i, x_f, x_z, x_o = _load4(x_row + tl.minimum(t + 1, T - 1) * (4 * Hd), Hd, mask)
        if HAS_STARTS:  # a start reads the zero state; n = 0 then triggers the first-step rule in _cell_step
            start = _starts_at(starts_ptr, rows, B, T, t)
            c = tl.where(start, 0.0, c)
            n = tl.where(start, 0.0, n)
            m = tl.where(start, 0.0, m)
            y = tl.where(start, 0.0, y)
        if RESIDENT:
            i += _matmul(y, w_i, DOT_BF16)
            f += _matmul(y, w_f, DOT_BF16)
            z += _matmul(y, w_z, DOT_BF16)
            o += _matmul(y, w_o, DOT_BF16)
        else:  # y_{t-1} from the buffer (written by the previous step, or the initial state)
            tl.debug_barrier()
            y_prev = y_ptr + t * Hd + h * d
            r_i = _streamed_matmul(y_prev, y_stride, r_ptr, 0, h, H, d, rows, B, D, BLOCK_K, False, DOT_BF16)
            r_f = _streamed_matmul(y_prev, y_stride, r_ptr, 1, h, H, d, rows, B, D, BLOCK_K, False, DOT_BF16)
            r_z = _streamed_matmul(y_prev, y_stride, r_ptr, 2, h, H, d, rows, B, D, BLOCK_K, False, DOT_BF16)
            r_o = _streamed_matmul(y_prev, y_stride, r_ptr, 3, h, H, d, rows, B, D, BLOCK_K, False, DOT_BF16)
            if HAS_STARTS:  # the buffer keeps the previous document's y: drop its product instead (per row)
                r_i = tl.where(start, 0.0, r_i)
                r_f = tl.where(start, 0.0, r_f)
                r_z = tl.where(start, 0.0, r_z)
                r_o = tl.where(start, 0.0, r_o)
            i += r_i
            f += r_f
            z += r_z
            o += r_o
        _store4(raw_row + t * (4 * Hd), Hd, i, f, z, o, mask)
        c, n, m, y = _cell_step(i, f, z, o, c, n, m, mask)
        _store_state(cnm_row + (t + 1) * (3 * Hd), Hd, c, n, m, mask)
        tl.store(y_row + (t + 1) * Hd, y, mask=mask)

@triton.jit
def _slstm_backward_kernel(
    r_ptr, starts_ptr, raw_ptr, cnm_ptr, gy_ptr, gfinal_ptr, graw_ptr, ginit_ptr, B, T, H, d,
    D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, RESIDENT: tl.constexpr,
    DOT_BF16: tl.constexpr, HAS_STARTS: tl.constexpr,
):  # fmt: skip
    """raw (B, T, 4, H, d), cnm (B, T+1, 3, H, d) from the forward; gy (B, T, H, d) dL/dy_t (final-y gradient
    included); gfinal (3, B, H, d) dL/d(c_T, n_T, m_T). Writes graw (B, T, 4, H, d) and ginit (4, B, H, d):
    dL/d(c_0, n_0, m_0, y_0). All float32. starts (B, T) int8 (HAS_STARTS): a start read the zero state, so it
    passes no gradient to the state (c, n, m, y) before it."""
    h = tl.program_id(1)
    rows, units, mask = _head_lanes(B, d, D, BLOCK_B)
    Hd = H * d
    BHd = B * Hd
    raw_row = raw_ptr + rows * (T * 4 * Hd) + h * d + units
    graw_row = graw_ptr + rows * (T * 4 * Hd) + h * d + units
    cnm_row = cnm_ptr + rows * ((T + 1) * 3 * Hd) + h * d + units
    gy_row = gy_ptr + rows * (T * Hd) + h * d + units
    state_at = rows * Hd + h * d + units
    g_c = tl.load(gfinal_ptr + state_at, mask=mask, other=0.0)
    g_n = tl.load(gfinal_ptr + BHd + state_at, mask=mask, other=0.0)
    g_m = tl.load(gfinal_ptr + 2 * BHd + state_at, mask=mask, other=0.0)
    g_y_rec = tl.zeros((BLOCK_B, D), dtype=tl.float32)  # sum_g dL/draw_{t+1, g} @ R[g]^T
    if RESIDENT:
        wt_i = _weight_tile(r_ptr, 0, h, H, d, D, True)
        wt_f = _weight_tile(r_ptr, 1, h, H, d, D, True)
        wt_z = _weight_tile(r_ptr, 2, h, H, d, D, True)
        wt_o = _weight_tile(r_ptr, 3, h, H, d, D, True)
    graw_stride = T * 4 * Hd
    # step t needs raw_t, gy_t, the state before it (cnm[t]) and after it (cnm[t+1]); the state after is the
    # previous iteration's "before", and the loads for step t - 1 are issued before step t's math (prefetch)
    c = tl.load(cnm_row + T * (3 * Hd), mask=mask, other=0.0)
    n = tl.load(cnm_row + T * (3 * Hd) + Hd, mask=mask, other=1.0)
    m = tl.load(cnm_row + T * (3 * Hd) + 2 * Hd, mask=mask, other=0.0)
    nx_i, nx_f, nx_z, nx_o = _load4(raw_row + (T - 1) * (4 * Hd), Hd, mask)
    nx_gy = tl.load(gy_row + (T - 1) * Hd, mask=mask, other=0.0)
    cnm_prev = cnm_row + (T - 1) * (3 * Hd)
    nx_c = tl.load(cnm_prev, mask=mask, other=0.0)
    nx_n = tl.load(cnm_prev + Hd, mask=mask, other=1.0)
    nx_m = tl.load(cnm_prev + 2 * Hd, mask=mask, other=0.0)
    for k in range(0, T):
        t = T - 1 - k
        i, f, z, o, gy_t = nx_i, nx_f, nx_z, nx_o, nx_gy
        c_prev, n_prev, m_prev = nx_c, nx_n, nx_m
        t_next = tl.maximum(t - 1, 0)
        nx_i, nx_f, nx_z, nx_o = _load4(raw_row + t_next * (4 * Hd), Hd, mask)
        nx_gy = tl.load(gy_row + t_next * Hd, mask=mask, other=0.0)
        cnm_prev = cnm_row + t_next * (3 * Hd)
        nx_c = tl.load(cnm_prev, mask=mask, other=0.0)
        nx_n = tl.load(cnm_prev + Hd, mask=mask, other=1.0)
        nx_m = tl.load(cnm_prev + 2 * Hd, mask=mask, other=0.0)
        g_y = gy_t + g_y_rec
        g_i, g_f, g_z, g_o, g_c, g_n, g_m = _document_cell_grads(
            i, f, z, o, c_prev, n_prev, m_prev, c, n, m, g_y, g_c, g_n, g_m, mask, starts_ptr, rows, B, T, t, HAS_STARTS
        )  # fmt: skip
        _store4(graw_row + t * (4 * Hd), Hd, g_i, g_f, g_z, g_o, mask)
        c, n, m = c_prev, n_prev, m_prev  # the state after step t - 1
        if RESIDENT:
            g_y_rec = (
                _matmul(g_i, wt_i, DOT_BF16) + _matmul(g_f, wt_f, DOT_BF16)
                + _matmul(g_z, wt_z, DOT_BF16) + _matmul(g_o, wt_o, DOT_BF16)
            )  # fmt: skip
        else:  # the gate gradients just stored, read back in column slices
            tl.debug_barrier()
            g_t = graw_ptr + t * (4 * Hd) + h * d
            g_y_rec = (
                _streamed_matmul(g_t, graw_stride, r_ptr, 0, h, H, d, rows, B, D, BLOCK_K, True, DOT_BF16)
                + _streamed_matmul(g_t + Hd, graw_stride, r_ptr, 1, h, H, d, rows, B, D, BLOCK_K, True, DOT_BF16)
                + _streamed_matmul(g_t + 2 * Hd, graw_stride, r_ptr, 2, h, H, d, rows, B, D, BLOCK_K, True,
                                   DOT_BF16)
                + _streamed_matmul(g_t + 3 * Hd, graw_stride, r_ptr, 3, h, H, d, rows, B, D, BLOCK_K, True,
                                   DOT_BF16)
            )  # fmt: skip
        if HAS_STARTS:  # dL/dy_{t-1} through step t's gates: none where step t read y = 0
            g_y_rec = tl.where(_starts_at(starts_ptr, rows, B, T, t), 0.0, g_y_rec)
    tl.store(ginit_ptr + state_at, g_c, mask=mask)
    tl.store(ginit_ptr + BHd + state_at, g_n, mask=mask)
    tl.store(ginit_ptr + 2 * BHd + state_at, g_m, mask=mask)
    tl.store(ginit_ptr + 3 * BHd + state_at, g_y_rec, mask=mask)


def weight_budget(dot_bf16: bool) -> int:
    """Bytes of recurrent weights one program keeps on chip: 128 KB in bf16; 64 KB in fp32, whose tf32x3 products
    stage split copies of the operands (measured on an H100: 128 KB of fp32 weights asked for 270 KB of shared
    memory, over the 227 KB limit)."""
    return (128 if dot_bf16 else 64) * 1024
