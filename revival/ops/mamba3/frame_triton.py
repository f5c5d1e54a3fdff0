"""Mamba-3's rotating frame for the SISO Triton path as a Triton kernel pair, forward + hand-written backward (GPU;
`TRITON_INTERPRET=1` for CPU tests): the angles and RoPE on B and C, written straight into SSD's 2H-head layout.

What it computes (the PyTorch form is `chunkwise.rotating_frame`, the math in `revival.ops.mamba3`'s module doc), per
(batch, head h) and angle k < N/2, with the pairs (i, i + N/2) rotating:

    phi_t = (0 if t starts a document else phi_{t-1}) + dt_t theta_t,   phi_{-1} = angle0
    keys[:, t, h] = R(phi_t)^T B_t,  keys[:, t + 1, H + h] = keys[:, t, h],  keys[:, 0, H + h] = R(angle0)^T prev_B
    queries[:, t, h] = queries[:, t, H + h] = R(phi_t)^T C_t,   angle_last = phi_{T-1}

Forward: one program per (batch, head) walks T in tiles of BT rows; a tile's angles are `tl.associative_scan` over
(keep, step) pairs, combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2) (keep = 0 at a document start), from the angle
carried out of the tile before; that carry is saved per tile (n*H, tiles, N/2), so the backward recomputes the angles
instead of reading an (n, T, H, N/2) tensor back. Backward: the same programs walk the tiles from the end. With
g = d keys (current head at t plus previous-token head at t + 1) and d queries (both heads), d B = R(phi) g_B,
d C = R(phi) g_C, d phi_t = sum over B and C of (g_1 u_2 - g_2 u_1) (u the rotated pair), and the angle gradient
runs backwards, G_t = d phi_t + (1 - start_{t+1}) G_{t+1} from G_T = d angle_last: the same scan reversed. Then
d dt_t = sum_k theta_t G_t, d theta_t = dt_t G_t per head, d angle0 = (1 - start_0) G_0 plus prev_B's rotation term.
theta's gradient is written per head, (n, T, H, N/2) float32: the layer passes theta as a stride-0 expand over heads
and a Function must return its input's shape, so autograd's expand backward sums the heads (one reduction kernel).

Segments (the B = 1 long-context case): with few batch*heads rows (125M at batch 1: 24 programs for 132 SMs, each
walking 1024 tiles at 32k) T's tiles are split into `segments` equal runs, one program per (row, segment), a
two-level scan. Forward: `_frame_sums_kernel` writes each segment's angle map phi -> keep phi + step (keep 0 if the
segment holds a start), and each forward program composes the maps of the segments before it (16 at a time,
`_carry_in`) onto angle0 before walking its own tiles. Backward: the first pass writes dB, dC and d phi (into
dtheta's buffer) and each segment's map G -> keep G + value; `_frame_bwd_scan_kernel` composes the later segments'
maps onto d angle_last, runs G over its own tiles from d phi and writes d dt, d theta and angle0's G term. One
segment is the single walk (one kernel each way, no sums), the default while rows >= the SMs (`default_segments`).

Inputs are read through their strides (theta's stride 0 over heads included, B and C any layout), computation in
float32 (float64 for float64 inputs). `launch` sets tiles and warps (`LaunchConfig`); results do not depend on them
beyond rounding order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._triton import HAVE_TRITON, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .._triton import linear_recurrence_combine

__all__ = ["LaunchConfig", "rotating_frame_triton"]


MAX_SEGMENTS = 256  # parts of T per (batch, head); the carry between them is combined _SEGMENT_BLOCK at a time
_SEGMENT_BLOCK = 16
_FALLBACK_SM_COUNT = 132  # an H200's: the interpreter (CPU tests) takes the GPU's segment choice at its shapes


@dataclass(frozen=True)
class LaunchConfig:
    """Time steps per tile (one size for both kernels: the backward starts its tiles from the forward's saved
    carries), warps of the forward and backward kernels (not tuned yet), and `segments`: parts of T that run in
    parallel per (batch, head), 1 to MAX_SEGMENTS (None: `default_segments`; 1 is the single walk over T)."""

    block_t: int = 32
    num_warps: int = 4
    backward_num_warps: int = 4
    segments: int | None = None


def default_segments(rows: int, tiles: int, sm_count: int) -> int:
    """1 (one walk over T per program) while the batch*heads `rows` programs cover the SMs; else enough segments
    for 4 programs per SM: at B = 1 the rows alone leave SMs idle while each walks all of T (125M, 32k: 24 programs,
    1024 tiles each; split, 528 programs of 47 tiles)."""
    if rows >= sm_count:
        return 1
    return max(1, min(tiles, MAX_SEGMENTS, -(-4 * sm_count // rows)))


if HAVE_TRITON:

    @triton.jit
    def _unrotate(first, second, cos, sin):
        """R(phi)^T on the pairs (first, second): R(-phi)."""
        return first * cos + second * sin, second * cos - first * sin

    @triton.jit
    def _keep(starts_ptr, n, t, T, HAS_STARTS: tl.constexpr, ACC: tl.constexpr):
        """1 where time t carries the angle over from t - 1, 0 at a document start (1 outside [0, T))."""
        keep = tl.full(t.shape, 1.0, ACC)
        if HAS_STARTS:
            start = tl.load(starts_ptr + n * T + t, mask=(t >= 0) & (t < T), other=0)
            keep = tl.where(start != 0, 0.0, keep)
        return keep

    @triton.jit
    def _load_dt_theta(dt_ptr, theta_ptr, n, h, t, cols, T, sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k, K,
                       ACC: tl.constexpr):
        """dt (BT,) and theta (BT, BK) at the tile's times, 0 past T."""
        tmask = t < T
        dt = tl.load(dt_ptr + n * sdt_n + h * sdt_h + t * sdt_t, mask=tmask, other=0.0).to(ACC)
        theta = tl.load(theta_ptr + n * sth_n + h * sth_h + t[:, None] * sth_t + cols[None, :] * sth_k,
                        mask=tmask[:, None] & (cols < K)[None, :], other=0.0).to(ACC)
        return dt, theta

    @triton.jit
    def _tile_scan(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, sdt_n, sdt_t, sdt_h,
                   sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, ACC: tl.constexpr):
        """The tile's (keep, step) scan: phi_t = keep_cum_t carry + step_cum_t; also dt (BT,) and theta (BT, BK)."""
        dt, theta = _load_dt_theta(dt_ptr, theta_ptr, n, h, t, cols, T, sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h,
                                   sth_k, K, ACC)
        keep = tl.broadcast_to(_keep(starts_ptr, n, t, T, HAS_STARTS, ACC)[:, None], (BT, BK))
        keep_cum, step_cum = tl.associative_scan((keep, dt[:, None] * theta), 0, linear_recurrence_combine)
        return keep_cum, step_cum, dt, theta

    @triton.jit
    def _tile_angles(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, carry, sdt_n, sdt_t, sdt_h,
                     sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, ACC: tl.constexpr):
        """phi at the tile's times t (BT,) from the angle `carry` before the tile; also dt (BT,) and theta (BT, BK)."""
        keep_cum, step_cum, dt, theta = _tile_scan(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, sdt_n, sdt_t,
                                                   sdt_h, sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS, BT, BK, ACC)
        return keep_cum * carry[None, :] + step_cum, dt, theta

    @triton.jit
    def _row_at(values, rows, i):
        """Row i of a (BT, BK) tile, (BK,)."""
        return tl.sum(tl.where(rows[:, None] == i, values, 0.0), axis=0)

    @triton.jit
    def _segment_tiles(seg, tiles_per_segment, tiles):
        """The tiles [first, stop) of segment `seg`."""
        first = seg * tiles_per_segment
        return first, tl.minimum(first + tiles_per_segment, tiles)

    @triton.jit
    def _carry_in(sums_ptr, row, seg, segments, carry, cols, BK: tl.constexpr, SB: tl.constexpr,
                  REVERSE: tl.constexpr):
        """The carry entering segment `seg`: `carry` (angle0; backwards d angle_last) through the maps
        v -> keep v + value of the segments before it (REVERSE: after it), sums (n*H, segments, 2, BK)."""
        blocks = tl.cdiv(segments, SB)
        count = blocks - seg // SB if REVERSE else tl.cdiv(seg, SB)
        offs = tl.arange(0, SB)
        for i in range(0, count):
            s = (blocks - 1 - i if REVERSE else i) * SB + offs
            use = ((s > seg) & (s < segments)) if REVERSE else s < seg
            ptrs = sums_ptr + (row * segments + s[:, None]) * 2 * BK + cols[None, :]
            keep = tl.load(ptrs, mask=use[:, None], other=1.0)
            value = tl.load(ptrs + BK, mask=use[:, None], other=0.0)
            keep_cum, value_cum = tl.associative_scan((keep, value), 0, linear_recurrence_combine, reverse=REVERSE)
            pick = offs[:, None] == (0 if REVERSE else SB - 1)
            carry = (tl.sum(tl.where(pick, keep_cum, 0.0), axis=0) * carry
                     + tl.sum(tl.where(pick, value_cum, 0.0), axis=0))
        return carry

    @triton.jit
    def _load_pair(ptr, off, stride_k, mask, K, ACC: tl.constexpr):
        return (tl.load(ptr + off, mask=mask, other=0.0).to(ACC),
                tl.load(ptr + off + K * stride_k, mask=mask, other=0.0).to(ACC))

    @triton.jit
    def _store_pair(ptr, off, first, second, mask, K):
        tl.store(ptr + off, first.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + off + K, second.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _frame_sums_kernel(dt_ptr, theta_ptr, starts_ptr, sums_ptr, T, H, K, segments, tiles_per_segment,
                           sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k,
                           HAS_STARTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
        """Per (batch*head, segment): the segment's angle map phi -> keep phi + step (keep 0 if it holds a start)."""
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        n, h = row // H, row % H
        rows, cols = tl.arange(0, BT), tl.arange(0, BK)
        first, stop = _segment_tiles(seg, tiles_per_segment, tl.cdiv(T, BT))
        keep = tl.full((BK,), 1.0, ACC)
        step = tl.zeros((BK,), ACC)
        for tile in range(first, stop):
            keep_cum, step_cum, _, _ = _tile_scan(dt_ptr, theta_ptr, starts_ptr, n, h, tile * BT + rows, cols, T,
                                                  sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS,
                                                  BT, BK, ACC)
            last_keep = _row_at(keep_cum, rows, BT - 1)  # rows past T: keep 1, step 0
            keep, step = keep * last_keep, last_keep * step + _row_at(step_cum, rows, BT - 1)
        out = sums_ptr + (row * segments + seg) * 2 * BK + cols
        tl.store(out, keep)
        tl.store(out + BK, step)

    @triton.jit
    def _frame_fwd_kernel(dt_ptr, theta_ptr, b_ptr, c_ptr, starts_ptr, angle0_ptr, prev_b_ptr, sums_ptr,
                          keys_ptr, queries_ptr, angle_last_ptr, carries_ptr, T, H, K, segments, tiles_per_segment,
                          sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k,
                          sb_n, sb_t, sb_h, sb_k, sc_n, sc_t, sc_h, sc_k,
                          HAS_STARTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, SB: tl.constexpr,
                          ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # batch * H + head
        seg = tl.program_id(1)
        n, h = row // H, row % H
        rows, cols = tl.arange(0, BT), tl.arange(0, BK)
        kmask = cols < K
        N = 2 * K
        angle0 = tl.load(angle0_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)
        if seg == 0:
            first, second = _load_pair(prev_b_ptr, row * N + cols, 1, kmask, K, ACC)
            first, second = _unrotate(first, second, tl.cos(angle0), tl.sin(angle0))
            _store_pair(keys_ptr, (n * T * 2 * H + H + h) * N + cols, first, second, kmask, K)  # keys[:, 0, H + h]
        carry = _carry_in(sums_ptr, row, seg, segments, angle0, cols, BK, SB, False)
        tiles = tl.cdiv(T, BT)
        first_tile, stop = _segment_tiles(seg, tiles_per_segment, tiles)
        for tile in range(first_tile, stop):
            t = tile * BT + rows
            mask = (t < T)[:, None] & kmask[None, :]
            tl.store(carries_ptr + (row * tiles + tile) * BK + cols, carry, mask=kmask)
            phi, _, _ = _tile_angles(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, carry, sdt_n, sdt_t, sdt_h,
                                     sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS, BT, BK, ACC)
            carry = _row_at(phi, rows, BT - 1)  # rows past T keep phi_{T-1}
            cos, sin = tl.cos(phi), tl.sin(phi)
            b1, b2 = _load_pair(b_ptr, n * sb_n + h * sb_h + t[:, None] * sb_t + cols[None, :] * sb_k, sb_k,
                                mask, K, ACC)
            b1, b2 = _unrotate(b1, b2, cos, sin)
            c1, c2 = _load_pair(c_ptr, n * sc_n + h * sc_h + t[:, None] * sc_t + cols[None, :] * sc_k, sc_k,
                                mask, K, ACC)
            c1, c2 = _unrotate(c1, c2, cos, sin)
            out = ((n * T + t[:, None]) * 2 * H + h) * N + cols[None, :]  # (n, T, 2H, N) at head h
            _store_pair(keys_ptr, out, b1, b2, mask, K)
            _store_pair(keys_ptr, out + (2 * H + H) * N, b1, b2, mask & (t + 1 < T)[:, None], K)  # t + 1, H + h
            _store_pair(queries_ptr, out, c1, c2, mask, K)
            _store_pair(queries_ptr, out + H * N, c1, c2, mask, K)
        if seg == segments - 1:
            tl.store(angle_last_ptr + row * K + cols, carry, mask=kmask)

    @triton.jit
    def _frame_bwd_kernel(dt_ptr, theta_ptr, b_ptr, c_ptr, starts_ptr, angle0_ptr, prev_b_ptr, carries_ptr,
                          dkeys_ptr, dqueries_ptr, dangle_last_ptr, sums_ptr,
                          ddt_ptr, dtheta_ptr, db_ptr, dc_ptr, dangle0_ptr, dprev_b_ptr, T, H, K,
                          segments, tiles_per_segment, sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k,
                          sb_n, sb_t, sb_h, sb_k, sc_n, sc_t, sc_h, sc_k,
                          HAS_STARTS: tl.constexpr, SINGLE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          ACC: tl.constexpr):
        """SINGLE (one segment): the whole backward, G from d angle_last. Else the first pass of a segment: dB, dC,
        d phi into dtheta's buffer and the segment's map G -> keep G + value into sums (`_frame_bwd_scan_kernel`)."""
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        n, h = row // H, row % H
        rows, cols = tl.arange(0, BT), tl.arange(0, BK)
        kmask = cols < K
        N = 2 * K
        if SINGLE:
            grad = tl.load(dangle_last_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)  # G_T: d angle_last
        else:
            grad = tl.zeros((BK,), ACC)
        keep_total = tl.full((BK,), 1.0, ACC)
        tiles = tl.cdiv(T, BT)
        first_tile, stop = _segment_tiles(seg, tiles_per_segment, tiles)
        for i in range(0, stop - first_tile):
            tile = stop - 1 - i
            t = tile * BT + rows
            tmask = t < T
            mask = tmask[:, None] & kmask[None, :]
            carry = tl.load(carries_ptr + (row * tiles + tile) * BK + cols, mask=kmask, other=0.0)
            phi, dt, theta = _tile_angles(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, carry, sdt_n, sdt_t,
                                          sdt_h, sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS, BT, BK, ACC)
            cos, sin = tl.cos(phi), tl.sin(phi)
            out = ((n * T + t[:, None]) * 2 * H + h) * N + cols[None, :]
            g1, g2 = _load_pair(dkeys_ptr, out, 1, mask, K, ACC)
            s1, s2 = _load_pair(dkeys_ptr, out + (2 * H + H) * N, 1, mask & (t + 1 < T)[:, None], K, ACC)
            g1, g2 = g1 + s1, g2 + s2
            b1, b2 = _load_pair(b_ptr, n * sb_n + h * sb_h + t[:, None] * sb_t + cols[None, :] * sb_k, sb_k,
                                mask, K, ACC)
            u1, u2 = _unrotate(b1, b2, cos, sin)
            dphi = g1 * u2 - g2 * u1
            grads = ((n * T + t[:, None]) * H + h) * N + cols[None, :]  # (n, T, H, N)
            _store_pair(db_ptr, grads, g1 * cos - g2 * sin, g1 * sin + g2 * cos, mask, K)  # R(phi) g
            g1, g2 = _load_pair(dqueries_ptr, out, 1, mask, K, ACC)
            s1, s2 = _load_pair(dqueries_ptr, out + H * N, 1, mask, K, ACC)
            g1, g2 = g1 + s1, g2 + s2
            c1, c2 = _load_pair(c_ptr, n * sc_n + h * sc_h + t[:, None] * sc_t + cols[None, :] * sc_k, sc_k,
                                mask, K, ACC)
            u1, u2 = _unrotate(c1, c2, cos, sin)
            dphi += g1 * u2 - g2 * u1
            _store_pair(dc_ptr, grads, g1 * cos - g2 * sin, g1 * sin + g2 * cos, mask, K)
            # G_t = d phi_t + keep_{t+1} G_{t+1}: the forward scan run from the tile's end
            keep_next = tl.broadcast_to(_keep(starts_ptr, n, t + 1, T, HAS_STARTS, ACC)[:, None], (BT, BK))
            keep_cum, dphi_cum = tl.associative_scan((keep_next, tl.where(mask, dphi, 0.0)), 0,
                                                     linear_recurrence_combine, reverse=True)
            G = keep_cum * grad[None, :] + dphi_cum
            grad = _row_at(G, rows, 0)
            dtheta = dtheta_ptr + ((n * T + t[:, None]) * H + h) * K + cols[None, :]
            if SINGLE:
                tl.store(ddt_ptr + (n * T + t) * H + h, tl.sum(tl.where(mask, theta * G, 0.0), axis=1), mask=tmask)
                tl.store(dtheta, dt[:, None] * G, mask=mask)
            else:
                keep_total *= _row_at(keep_cum, rows, 0)
                tl.store(dtheta, dphi, mask=mask)
        if not SINGLE:
            sums = sums_ptr + (row * segments + seg) * 2 * BK + cols
            tl.store(sums, keep_total)
            tl.store(sums + BK, grad)
        if seg == 0:
            # angle0 reaches phi_0 unless t = 0 starts a document, and rotates prev_B into keys[:, 0, H + h]
            zero = tl.arange(0, 1)
            keep0 = tl.sum(_keep(starts_ptr, n, zero, T, HAS_STARTS, ACC), axis=0)
            angle0 = tl.load(angle0_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)
            cos, sin = tl.cos(angle0), tl.sin(angle0)
            b1, b2 = _load_pair(prev_b_ptr, row * N + cols, 1, kmask, K, ACC)
            u1, u2 = _unrotate(b1, b2, cos, sin)
            g1, g2 = _load_pair(dkeys_ptr, (n * T * 2 * H + H + h) * N + cols, 1, kmask, K, ACC)
            _store_pair(dprev_b_ptr, row * N + cols, g1 * cos - g2 * sin, g1 * sin + g2 * cos, kmask, K)
            dangle0 = g1 * u2 - g2 * u1
            if SINGLE:  # else the scan kernel adds it
                dangle0 += keep0 * grad
            tl.store(dangle0_ptr + row * K + cols, dangle0, mask=kmask)

    @triton.jit
    def _frame_bwd_scan_kernel(dt_ptr, theta_ptr, starts_ptr, sums_ptr, dangle_last_ptr, ddt_ptr, dtheta_ptr,
                               dangle0_ptr, T, H, K, segments, tiles_per_segment,
                               sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k,
                               HAS_STARTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, SB: tl.constexpr,
                               ACC: tl.constexpr):
        """Second backward pass of a segment: G entering from d angle_last through the later segments' maps, each
        tile's G from the d phi in dtheta's buffer; then d dt = sum_k theta G, d theta = dt G,
        d angle0 += keep_0 G_0."""
        row = tl.program_id(0).to(tl.int64)
        seg = tl.program_id(1)
        n, h = row // H, row % H
        rows, cols = tl.arange(0, BT), tl.arange(0, BK)
        kmask = cols < K
        grad = tl.load(dangle_last_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)
        grad = _carry_in(sums_ptr, row, seg, segments, grad, cols, BK, SB, True)
        first_tile, stop = _segment_tiles(seg, tiles_per_segment, tl.cdiv(T, BT))
        for i in range(0, stop - first_tile):
            t = (stop - 1 - i) * BT + rows
            tmask = t < T
            mask = tmask[:, None] & kmask[None, :]
            dt, theta = _load_dt_theta(dt_ptr, theta_ptr, n, h, t, cols, T, sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h,
                                       sth_k, K, ACC)
            dtheta = dtheta_ptr + ((n * T + t[:, None]) * H + h) * K + cols[None, :]
            dphi = tl.load(dtheta, mask=mask, other=0.0)
            keep_next = tl.broadcast_to(_keep(starts_ptr, n, t + 1, T, HAS_STARTS, ACC)[:, None], (BT, BK))
            keep_cum, dphi_cum = tl.associative_scan((keep_next, dphi), 0, linear_recurrence_combine, reverse=True)
            G = keep_cum * grad[None, :] + dphi_cum
            grad = _row_at(G, rows, 0)
            tl.store(ddt_ptr + (n * T + t) * H + h, tl.sum(tl.where(mask, theta * G, 0.0), axis=1), mask=tmask)
            tl.store(dtheta, dt[:, None] * G, mask=mask)
        if seg == 0:
            zero = tl.arange(0, 1)
            keep0 = tl.sum(_keep(starts_ptr, n, zero, T, HAS_STARTS, ACC), axis=0)
            dangle0 = dangle0_ptr + row * K + cols
            tl.store(dangle0, tl.load(dangle0, mask=kmask, other=0.0) + keep0 * grad, mask=kmask)


def _strides(dt, theta, B, C) -> tuple[int, ...]:
    return (*dt.stride(), *theta.stride(), *B.stride(), *C.stride())


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _FALLBACK_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _segments(T: int, rows: int, launch: LaunchConfig, device: torch.device) -> tuple[int, int]:
    """(segments, tiles per segment): T's tiles split into equal runs, none empty."""
    tiles = triton.cdiv(T, launch.block_t)
    wanted = default_segments(rows, tiles, _sm_count(device)) if launch.segments is None else launch.segments
    per = triton.cdiv(tiles, min(wanted, tiles))
    return triton.cdiv(tiles, per), per


class _Frame(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, theta, B, C, angle0, prev_B, starts, dtype, launch):
        n, T, H, N = B.shape
        K = N // 2
        acc = torch.float64 if torch.float64 in (dt.dtype, theta.dtype, B.dtype, C.dtype) else torch.float32
        ACC = tl.float64 if acc == torch.float64 else tl.float32
        angle0, prev_B = angle0.contiguous(), prev_B.contiguous()
        keys = torch.empty(n, T, 2 * H, N, device=B.device, dtype=dtype)
        queries = torch.empty_like(keys)
        angle_last = torch.empty(n, H, K, device=B.device, dtype=acc)
        BK = triton.next_power_of_2(K)
        carries = torch.empty(n * H, triton.cdiv(T, launch.block_t), BK, device=B.device, dtype=acc)
        segments, per = _segments(T, n * H, launch, B.device)
        starts_arg = dt if starts is None else starts  # dt stands in for absent starts: never read
        strides = _strides(dt, theta, B, C)
        sums = carries  # one segment: no sums, never read
        if segments > 1:
            sums = torch.empty(n * H, segments, 2, BK, device=B.device, dtype=acc)
            _frame_sums_kernel[(n * H, segments)](
                dt, theta, starts_arg, sums, T, H, K, segments, per, *strides[:7], HAS_STARTS=starts is not None,
                BT=launch.block_t, BK=BK, ACC=ACC, num_warps=launch.num_warps)
        _frame_fwd_kernel[(n * H, segments)](
            dt, theta, B, C, starts_arg, angle0, prev_B, sums, keys, queries, angle_last, carries,
            T, H, K, segments, per, *strides, HAS_STARTS=starts is not None, BT=launch.block_t, BK=BK,
            SB=_SEGMENT_BLOCK, ACC=ACC, num_warps=launch.num_warps)
        ctx.save_for_backward(dt, theta, B, C, starts, angle0, prev_B, carries)
        ctx.acc, ctx.launch, ctx.segments = acc, launch, (segments, per)
        return keys, queries, angle_last

    @staticmethod
    def backward(ctx, dkeys, dqueries, dangle_last):
        dt, theta, B, C, starts, angle0, prev_B, carries = ctx.saved_tensors
        n, T, H, N = B.shape
        K, acc, launch = N // 2, ctx.acc, ctx.launch
        ACC = tl.float64 if acc == torch.float64 else tl.float32
        segments, per = ctx.segments
        BK = triton.next_power_of_2(K)
        if dkeys is None or dqueries is None:  # only then: a (n, T, 2H, N) float32 fill is a full pass
            zeros = torch.zeros(n, T, 2 * H, N, device=B.device, dtype=acc)
        dkeys = zeros if dkeys is None else dkeys.contiguous()
        dqueries = zeros if dqueries is None else dqueries.contiguous()
        dangle_last = torch.zeros_like(angle0, dtype=acc) if dangle_last is None else dangle_last.contiguous()
        ddt, dtheta = (torch.empty(shape, device=B.device, dtype=acc) for shape in ((n, T, H), (n, T, H, K)))
        dB, dC = (torch.empty(n, T, H, N, device=B.device, dtype=acc) for _ in range(2))
        dangle0, dprev_B = (torch.empty(shape, device=B.device, dtype=acc) for shape in ((n, H, K), (n, H, N)))
        starts_arg = dt if starts is None else starts
        strides = _strides(dt, theta, B, C)
        single = segments == 1
        sums = carries if single else torch.empty(n * H, segments, 2, BK, device=B.device, dtype=acc)
        _frame_bwd_kernel[(n * H, segments)](
            dt, theta, B, C, starts_arg, angle0, prev_B, carries, dkeys, dqueries, dangle_last, sums,
            ddt, dtheta, dB, dC, dangle0, dprev_B, T, H, K, segments, per, *strides,
            HAS_STARTS=starts is not None, SINGLE=single, BT=launch.block_t, BK=BK, ACC=ACC,
            num_warps=launch.backward_num_warps)
        if not single:  # the angle gradient's scan across segments, then within each
            _frame_bwd_scan_kernel[(n * H, segments)](
                dt, theta, starts_arg, sums, dangle_last, ddt, dtheta, dangle0, T, H, K, segments, per,
                *strides[:7], HAS_STARTS=starts is not None, BT=launch.block_t, BK=BK, SB=_SEGMENT_BLOCK, ACC=ACC,
                num_warps=launch.backward_num_warps)
        return (ddt.to(dt.dtype), dtheta.to(theta.dtype), dB.to(B.dtype), dC.to(C.dtype), dangle0.to(angle0.dtype),
                dprev_B.to(prev_B.dtype), None, None, None)


def rotating_frame_triton(dt, theta, B, C, angle0, prev_B, document_starts=None, *, dtype=None,
                          launch: LaunchConfig | None = None):
    """The angles and RoPE of B and C in SSD's 2H-head layout (module doc). dt (n, T, H); theta (n, T, H, N/2);
    B, C (n, T, H, N); angle0 (n, H, N/2); prev_B (n, H, N); document_starts (n, T) bool or None (validated by
    the caller). Returns keys, queries (n, T, 2H, N) in `dtype` (None: float32, float64 for float64 inputs) and
    angle_last (n, H, N/2) in the compute dtype; differentiable in dt, theta, B, C, angle0 and prev_B."""
    require_triton()
    n, T, H, N = B.shape
    if N % 2 or tuple(C.shape) != (n, T, H, N):
        raise ValueError(f"B, C: expected equal shapes (n, T, H, N) with N even, got {tuple(B.shape)} and "
                         f"{tuple(C.shape)}")
    for name, tensor, shape in (("dt", dt, (n, T, H)), ("theta", theta, (n, T, H, N // 2)),
                                ("angle0", angle0, (n, H, N // 2)), ("prev_B", prev_B, (n, H, N))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
    launch = LaunchConfig() if launch is None else launch
    if not isinstance(launch, LaunchConfig):
        raise ValueError(f"launch: expected a LaunchConfig or None, got {type(launch).__name__}")
    segments = launch.segments
    if segments is not None and not (isinstance(segments, int) and 1 <= segments <= MAX_SEGMENTS):
        raise ValueError(f"launch.segments: expected None or an int in [1, {MAX_SEGMENTS}], got {launch.segments!r}")
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (dt.dtype, theta.dtype, B.dtype, C.dtype) else torch.float32
    starts = None if document_starts is None else document_starts.to(torch.int8).contiguous()
    return _Frame.apply(dt, theta, B, C, angle0, prev_B, starts, dtype, launch)
