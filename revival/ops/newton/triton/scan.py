"""Triton scans for the linearised Newton step, diagonal and 2 x 2 blocks, plus the fused ParaRNN Newton steps.

One program per (block of channels, batch row) walks time in tiles of BT steps: it loads a (BT, BC) tile, solves it
with `tl.associative_scan` over (A, b) pairs, combine (A1, b1), (A2, b2) -> (A2 A1, A2 b1 + b2) (the second is the
later one), and carries the last row into the next tile. reverse=True walks time backwards (tile rows map to
t = T - 1 - row), which solves x_t = A_t x_{t+1} + b_t. States and arithmetic are float32; inputs any float dtype.
The fused steps recompute the cell from (x, h_{t-1}, h_t) inside the tile, so J and the residual never touch memory.
"""

from __future__ import annotations

import torch

from ..._triton import HAVE_TRITON, available

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from ...linear_scan.triton import scan_tile

__all__ = ["available", "block2_scan_triton", "diagonal_scan_triton", "paragru_newton_step_triton",
           "paralstm_newton_step_triton"]

# Tile of BT time steps x BC channels and warps per program (not tuned on a GPU yet; see benchmarks/gpu_newton.py).
BLOCKS = {"BT": 32, "BC": 64, "num_warps": 4}


if HAVE_TRITON:

    @triton.jit
    def _combine_block2(p1, q1, r1, s1, u1, v1, p2, q2, r2, s2, u2, v2):
        # [[p, q], [r, s]] acting on [u, v]; (later 2) o (earlier 1)
        return (p2 * p1 + q2 * r1, p2 * q1 + q2 * s1, r2 * p1 + s2 * r1, r2 * q1 + s2 * s1,
                p2 * u1 + q2 * v1 + u2, r2 * u1 + s2 * v1 + v2)

    @triton.jit
    def _last_row(x, rows, BT: tl.constexpr):
        return tl.sum(tl.where(rows[:, None] == BT - 1, x, 0.0), axis=0)

    @triton.jit
    def _block2_tile(p, q, r, s, u, v, mask, cu, cv, rows, BT: tl.constexpr):
        p = tl.where(mask, p, 1.0)
        q = tl.where(mask, q, 0.0)
        r = tl.where(mask, r, 0.0)
        s = tl.where(mask, s, 1.0)
        u = tl.where(mask, u, 0.0)
        v = tl.where(mask, v, 0.0)
        p, q, r, s, u, v = tl.associative_scan((p, q, r, s, u, v), 0, _combine_block2)
        xu = p * cu[None, :] + q * cv[None, :] + u
        xv = r * cu[None, :] + s * cv[None, :] + v
        return xu, xv, _last_row(xu, rows, BT), _last_row(xv, rows, BT)

    @triton.jit
    def _times(t0, rows, T, REVERSE: tl.constexpr):
        steps = t0 + rows
        if REVERSE:
            return T - 1 - steps, steps < T
        return steps, steps < T

    @triton.jit
    def _program_channels(C, BT: tl.constexpr, BC: tl.constexpr):
        """This program's channels (BC,) and their mask, its batch row, and the rows of a time tile (BT,)."""
        cols = tl.program_id(0) * BC + tl.arange(0, BC)
        return cols, cols < C, tl.program_id(1).to(tl.int64), tl.arange(0, BT)

    @triton.jit
    def _channel_row(ptr, index, N, cols, cmask):
        """Row `index` of an (., N) parameter at this program's channels, as a (1, BC) tile."""
        return tl.load(ptr + index * N + cols, mask=cmask, other=0.0)[None, :]

    @triton.jit
    def _diag_scan_kernel(a_ptr, b_ptr, x_ptr, T, C, REVERSE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        cols, cmask, batch, rows = _program_channels(C, BT, BC)
        base = batch * T * C
        carry = tl.zeros([BC], dtype=tl.float32)
        for t0 in range(0, T, BT):
            t, tmask = _times(t0, rows, T, REVERSE)
            mask = tmask[:, None] & cmask[None, :]
            off = base + t[:, None].to(tl.int64) * C + cols[None, :]
            a = tl.load(a_ptr + off, mask=mask, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
            x, carry = scan_tile(a, b, mask, carry, rows, BT)
            tl.store(x_ptr + off, x, mask=mask)

    @triton.jit
    def _block2_scan_kernel(a_ptr, b_ptr, x_ptr, T, G, REVERSE: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
        cols, cmask, batch, rows = _program_channels(G, BT, BC)
        cu = tl.zeros([BC], dtype=tl.float32)
        cv = tl.zeros([BC], dtype=tl.float32)
        for t0 in range(0, T, BT):
            t, tmask = _times(t0, rows, T, REVERSE)
            mask = tmask[:, None] & cmask[None, :]
            unit = (batch * T + t[:, None].to(tl.int64)) * G + cols[None, :]
            p = tl.load(a_ptr + unit * 4, mask=mask, other=1.0).to(tl.float32)
            q = tl.load(a_ptr + unit * 4 + 1, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(a_ptr + unit * 4 + 2, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(a_ptr + unit * 4 + 3, mask=mask, other=1.0).to(tl.float32)
            u = tl.load(b_ptr + unit * 2, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(b_ptr + unit * 2 + 1, mask=mask, other=0.0).to(tl.float32)
            xu, xv, cu, cv = _block2_tile(p, q, r, s, u, v, mask, cu, cv, rows, BT)
            tl.store(x_ptr + unit * 2, xu, mask=mask)
            tl.store(x_ptr + unit * 2 + 1, xv, mask=mask)

    @triton.jit
    def _scaled_error(value, h, mask):
        err = tl.abs(value - h) / (1.0 + tl.abs(h))
        err = tl.where(err == err, err, float("inf"))  # NaN counts as not converged
        return tl.where(mask, err, 0.0)

    @triton.jit
    def _paragru_newton_kernel(x_ptr, h_ptr, h0_ptr, a_ptr, out_ptr, res_ptr, T, N, BT: tl.constexpr,
                               BC: tl.constexpr):
        cols, cmask, batch, rows = _program_channels(N, BT, BC)
        a_z = _channel_row(a_ptr, 0, N, cols, cmask)
        a_r = _channel_row(a_ptr, 1, N, cols, cmask)
        a_h = _channel_row(a_ptr, 2, N, cols, cmask)
        h0 = tl.load(h0_ptr + batch * N + cols, mask=cmask, other=0.0)
        carry = tl.zeros([BC], dtype=tl.float32)
        worst = tl.zeros([BC], dtype=tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + rows
            mask = (t < T)[:, None] & cmask[None, :]
            off = (batch * T + t[:, None].to(tl.int64)) * N + cols[None, :]
            x_off = (batch * T + t[:, None].to(tl.int64)) * 3 * N + cols[None, :]
            h = tl.load(h_ptr + off, mask=mask, other=0.0)
            h_prev = tl.load(h_ptr + off - N, mask=mask & (t > 0)[:, None], other=0.0)
            h_prev = tl.where((t == 0)[:, None], h0[None, :], h_prev)
            z = tl.sigmoid(tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32) + a_z * h_prev)
            r = tl.sigmoid(tl.load(x_ptr + x_off + N, mask=mask, other=0.0).to(tl.float32) + a_r * h_prev)
            pre = tl.load(x_ptr + x_off + 2 * N, mask=mask, other=0.0).to(tl.float32) + a_h * (r * h_prev)
            hc = 2.0 * tl.sigmoid(2.0 * pre) - 1.0  # tanh
            value = h_prev + z * (hc - h_prev)
            jac = (1.0 - z) + z * (1.0 - z) * a_z * (hc - h_prev) \
                + z * (1.0 - hc * hc) * a_h * (r + h_prev * r * (1.0 - r) * a_r)
            worst = tl.maximum(worst, tl.max(_scaled_error(value, h, mask), axis=0))
            delta, carry = scan_tile(jac, value - h, mask, carry, rows, BT)
            tl.store(out_ptr + off, h + delta, mask=mask)
        tl.store(res_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.max(worst, axis=0))

    @triton.jit
    def _paralstm_newton_kernel(x_ptr, h_ptr, h0_ptr, a_ptr, p_ptr, out_ptr, res_ptr, T, N, BT: tl.constexpr,
                                BC: tl.constexpr):
        cols, cmask, batch, rows = _program_channels(N, BT, BC)
        a_f = _channel_row(a_ptr, 0, N, cols, cmask)
        a_o = _channel_row(a_ptr, 1, N, cols, cmask)
        a_c = _channel_row(a_ptr, 2, N, cols, cmask)
        p_f = _channel_row(p_ptr, 0, N, cols, cmask)
        p_o = _channel_row(p_ptr, 1, N, cols, cmask)
        c0 = tl.load(h0_ptr + (batch * N + cols) * 2, mask=cmask, other=0.0)
        y0 = tl.load(h0_ptr + (batch * N + cols) * 2 + 1, mask=cmask, other=0.0)
        cu = tl.zeros([BC], dtype=tl.float32)
        cv = tl.zeros([BC], dtype=tl.float32)
        worst = tl.zeros([BC], dtype=tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + rows
            mask = (t < T)[:, None] & cmask[None, :]
            first = (t == 0)[:, None]
            unit = (batch * T + t[:, None].to(tl.int64)) * N + cols[None, :]
            x_off = (batch * T + t[:, None].to(tl.int64)) * 3 * N + cols[None, :]
            c = tl.load(h_ptr + unit * 2, mask=mask, other=0.0)
            y = tl.load(h_ptr + unit * 2 + 1, mask=mask, other=0.0)
            prev_mask = mask & (t > 0)[:, None]
            c_prev = tl.where(first, c0[None, :], tl.load(h_ptr + (unit - N) * 2, mask=prev_mask, other=0.0))
            y_prev = tl.where(first, y0[None, :], tl.load(h_ptr + (unit - N) * 2 + 1, mask=prev_mask, other=0.0))
            f = tl.sigmoid(tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32) + a_f * y_prev
                           + p_f * c_prev)
            cc = 2.0 * tl.sigmoid(2.0 * (tl.load(x_ptr + x_off + 2 * N, mask=mask, other=0.0).to(tl.float32)
                                         + a_c * y_prev)) - 1.0
            c_new = f * c_prev + (1.0 - f) * cc
            o = tl.sigmoid(tl.load(x_ptr + x_off + N, mask=mask, other=0.0).to(tl.float32) + a_o * y_prev
                           + p_o * c_new)
            tc = 2.0 * tl.sigmoid(2.0 * c_new) - 1.0
            y_new = o * tc
            df = f * (1.0 - f) * (c_prev - cc)
            dc_dc = f + df * p_f
            dc_dh = df * a_f + (1.0 - f) * (1.0 - cc * cc) * a_c
            do = o * (1.0 - o) * tc
            dh_dcnew = o * (1.0 - tc * tc) + do * p_o
            worst = tl.maximum(worst, tl.max(_scaled_error(c_new, c, mask), axis=0))
            worst = tl.maximum(worst, tl.max(_scaled_error(y_new, y, mask), axis=0))
            du, dv, cu, cv = _block2_tile(dc_dc, dc_dh, dh_dcnew * dc_dc, do * a_o + dh_dcnew * dc_dh,
                                          c_new - c, y_new - y, mask, cu, cv, rows, BT)
            tl.store(out_ptr + unit * 2, c + du, mask=mask)
            tl.store(out_ptr + unit * 2 + 1, y + dv, mask=mask)
        tl.store(res_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), tl.max(worst, axis=0))


def _grid(channels: int, batch: int) -> tuple[int, int]:
    return (triton.cdiv(channels, BLOCKS["BC"]), batch)


def diagonal_scan_triton(coeff: torch.Tensor, rhs: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """x_t = coeff_t x_{t-1} + rhs_t (reverse: x_{t+1}), elementwise over (B, T, *S); float32 result."""
    B, T = rhs.shape[:2]
    coeff, rhs = coeff.contiguous(), rhs.contiguous()
    out = torch.empty(rhs.shape, dtype=torch.float32, device=rhs.device)
    C = rhs[0, 0].numel()
    _diag_scan_kernel[_grid(C, B)](coeff, rhs, out, T, C, REVERSE=reverse, BT=BLOCKS["BT"], BC=BLOCKS["BC"],
                                   num_warps=BLOCKS["num_warps"])
    return out


def block2_scan_triton(coeff: torch.Tensor, rhs: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """x_t = coeff_t x_{t-1} + rhs_t with 2 x 2 blocks: coeff (B, T, G, 2, 2), rhs (B, T, G, 2); float32."""
    B, T, G, _ = rhs.shape
    coeff, rhs = coeff.contiguous(), rhs.contiguous()
    out = torch.empty(rhs.shape, dtype=torch.float32, device=rhs.device)
    _block2_scan_kernel[_grid(G, B)](coeff, rhs, out, T, G, REVERSE=reverse, BT=BLOCKS["BT"], BC=BLOCKS["BC"],
                                     num_warps=BLOCKS["num_warps"])
    return out


def paragru_newton_step_triton(x, h, h0, a) -> tuple[torch.Tensor, float]:
    """x (B, T, 3, N) any float dtype, h (B, T, N) / h0 (B, N) / a (3, N) float32 -> (next iterate, residual of h)."""
    B, T, N = h.shape
    x, h, h0, a = x.contiguous(), h.contiguous(), h0.contiguous(), a.contiguous()
    out = torch.empty_like(h)
    grid = _grid(N, B)
    res = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=h.device)
    _paragru_newton_kernel[grid](x, h, h0, a, out, res, T, N, BT=BLOCKS["BT"], BC=BLOCKS["BC"],
                                 num_warps=BLOCKS["num_warps"])
    return out, float(res.max())


def paralstm_newton_step_triton(x, h, h0, a, p) -> tuple[torch.Tensor, float]:
    """x (B, T, 3, N), h (B, T, N, 2) / h0 (B, N, 2) / a (3, N) / p (2, N) float32 -> (next iterate, residual)."""
    B, T, N, _ = h.shape
    x, h, h0, a, p = x.contiguous(), h.contiguous(), h0.contiguous(), a.contiguous(), p.contiguous()
    out = torch.empty_like(h)
    grid = _grid(N, B)
    res = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=h.device)
    _paralstm_newton_kernel[grid](x, h, h0, a, p, out, res, T, N, BT=BLOCKS["BT"], BC=BLOCKS["BC"],
                                  num_warps=BLOCKS["num_warps"])
    return out, float(res.max())
