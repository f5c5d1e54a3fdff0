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

Inputs are read through their strides (theta's stride 0 over heads included, B and C any layout), computation in
float32 (float64 for float64 inputs). `launch` sets tiles and warps (`LaunchConfig`); results do not depend on them
beyond rounding order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton import HAVE_TRITON, require_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .._triton import linear_recurrence_combine

__all__ = ["LaunchConfig", "rotating_frame_triton"]


@dataclass(frozen=True)
class LaunchConfig:
    """Time steps per tile (one size for both kernels: the backward starts its tiles from the forward's saved
    carries) and warps of the forward and backward kernels (not tuned yet)."""

    block_t: int = 32
    num_warps: int = 4
    backward_num_warps: int = 4


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
    def _tile_angles(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, carry, sdt_n, sdt_t, sdt_h,
                     sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS: tl.constexpr, BT: tl.constexpr,
                     BK: tl.constexpr, ACC: tl.constexpr):
        """phi at the tile's times t (BT,) from the angle `carry` before the tile; also dt (BT,) and theta (BT, BK)."""
        tmask = t < T
        mask = tmask[:, None] & (cols < K)[None, :]
        dt = tl.load(dt_ptr + n * sdt_n + h * sdt_h + t * sdt_t, mask=tmask, other=0.0).to(ACC)
        theta = tl.load(theta_ptr + n * sth_n + h * sth_h + t[:, None] * sth_t + cols[None, :] * sth_k,
                        mask=mask, other=0.0).to(ACC)
        keep = tl.broadcast_to(_keep(starts_ptr, n, t, T, HAS_STARTS, ACC)[:, None], (BT, BK))
        keep_cum, step_cum = tl.associative_scan((keep, dt[:, None] * theta), 0, linear_recurrence_combine)
        return keep_cum * carry[None, :] + step_cum, dt, theta

    @triton.jit
    def _load_pair(ptr, off, stride_k, mask, K, ACC: tl.constexpr):
        return (tl.load(ptr + off, mask=mask, other=0.0).to(ACC),
                tl.load(ptr + off + K * stride_k, mask=mask, other=0.0).to(ACC))

    @triton.jit
    def _store_pair(ptr, off, first, second, mask, K):
        tl.store(ptr + off, first.to(ptr.dtype.element_ty), mask=mask)
        tl.store(ptr + off + K, second.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _frame_fwd_kernel(dt_ptr, theta_ptr, b_ptr, c_ptr, starts_ptr, angle0_ptr, prev_b_ptr,
                          keys_ptr, queries_ptr, angle_last_ptr, carries_ptr, T, H, K,
                          sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k,
                          sb_n, sb_t, sb_h, sb_k, sc_n, sc_t, sc_h, sc_k,
                          HAS_STARTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # batch * H + head
        n, h = row // H, row % H
        rows, cols = tl.arange(0, BT), tl.arange(0, BK)
        kmask = cols < K
        N = 2 * K
        carry = tl.load(angle0_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)
        first, second = _load_pair(prev_b_ptr, row * N + cols, 1, kmask, K, ACC)
        first, second = _unrotate(first, second, tl.cos(carry), tl.sin(carry))
        _store_pair(keys_ptr, (n * T * 2 * H + H + h) * N + cols, first, second, kmask, K)  # keys[:, 0, H + h]
        tiles = tl.cdiv(T, BT)
        for tile in range(0, tiles):
            t = tile * BT + rows
            mask = (t < T)[:, None] & kmask[None, :]
            tl.store(carries_ptr + (row * tiles + tile) * BK + cols, carry, mask=kmask)
            phi, _, _ = _tile_angles(dt_ptr, theta_ptr, starts_ptr, n, h, t, cols, T, carry, sdt_n, sdt_t, sdt_h,
                                     sth_n, sth_t, sth_h, sth_k, K, HAS_STARTS, BT, BK, ACC)
            carry = tl.sum(tl.where(rows[:, None] == BT - 1, phi, 0.0), axis=0)  # rows past T keep phi_{T-1}
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
        tl.store(angle_last_ptr + row * K + cols, carry, mask=kmask)

    @triton.jit
    def _frame_bwd_kernel(dt_ptr, theta_ptr, b_ptr, c_ptr, starts_ptr, angle0_ptr, prev_b_ptr, carries_ptr,
                          dkeys_ptr, dqueries_ptr, dangle_last_ptr,
                          ddt_ptr, dtheta_ptr, db_ptr, dc_ptr, dangle0_ptr, dprev_b_ptr, T, H, K,
                          sdt_n, sdt_t, sdt_h, sth_n, sth_t, sth_h, sth_k,
                          sb_n, sb_t, sb_h, sb_k, sc_n, sc_t, sc_h, sc_k,
                          HAS_STARTS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        n, h = row // H, row % H
        rows, cols = tl.arange(0, BT), tl.arange(0, BK)
        kmask = cols < K
        N = 2 * K
        grad = tl.load(dangle_last_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)  # G_T: d angle_last
        tiles = tl.cdiv(T, BT)
        for i in range(0, tiles):
            tile = tiles - 1 - i
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
            grad = tl.sum(tl.where(rows[:, None] == 0, G, 0.0), axis=0)
            tl.store(ddt_ptr + (n * T + t) * H + h, tl.sum(tl.where(mask, theta * G, 0.0), axis=1), mask=tmask)
            tl.store(dtheta_ptr + ((n * T + t[:, None]) * H + h) * K + cols[None, :], dt[:, None] * G, mask=mask)
        # angle0 reaches phi_0 unless t = 0 starts a document, and rotates prev_B into keys[:, 0, H + h]
        zero = tl.arange(0, 1)
        keep0 = tl.sum(_keep(starts_ptr, n, zero, T, HAS_STARTS, ACC), axis=0)
        angle0 = tl.load(angle0_ptr + row * K + cols, mask=kmask, other=0.0).to(ACC)
        cos, sin = tl.cos(angle0), tl.sin(angle0)
        b1, b2 = _load_pair(prev_b_ptr, row * N + cols, 1, kmask, K, ACC)
        u1, u2 = _unrotate(b1, b2, cos, sin)
        g1, g2 = _load_pair(dkeys_ptr, (n * T * 2 * H + H + h) * N + cols, 1, kmask, K, ACC)
        _store_pair(dprev_b_ptr, row * N + cols, g1 * cos - g2 * sin, g1 * sin + g2 * cos, kmask, K)
        tl.store(dangle0_ptr + row * K + cols, keep0 * grad + g1 * u2 - g2 * u1, mask=kmask)


def _strides(dt, theta, B, C) -> tuple[int, ...]:
    return (*dt.stride(), *theta.stride(), *B.stride(), *C.stride())


class _Frame(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt, theta, B, C, angle0, prev_B, starts, dtype, launch):
        n, T, H, N = B.shape
        K = N // 2
        acc = torch.float64 if torch.float64 in (dt.dtype, theta.dtype, B.dtype, C.dtype) else torch.float32
        angle0, prev_B = angle0.contiguous(), prev_B.contiguous()
        keys = torch.empty(n, T, 2 * H, N, device=B.device, dtype=dtype)
        queries = torch.empty_like(keys)
        angle_last = torch.empty(n, H, K, device=B.device, dtype=acc)
        BK = triton.next_power_of_2(K)
        carries = torch.empty(n * H, triton.cdiv(T, launch.block_t), BK, device=B.device, dtype=acc)
        _frame_fwd_kernel[(n * H,)](
            dt, theta, B, C, dt if starts is None else starts, angle0, prev_B, keys, queries, angle_last, carries,
            T, H, K, *_strides(dt, theta, B, C), HAS_STARTS=starts is not None, BT=launch.block_t, BK=BK,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=launch.num_warps)
        ctx.save_for_backward(dt, theta, B, C, starts, angle0, prev_B, carries)
        ctx.acc, ctx.launch = acc, launch
        return keys, queries, angle_last

    @staticmethod
    def backward(ctx, dkeys, dqueries, dangle_last):
        dt, theta, B, C, starts, angle0, prev_B, carries = ctx.saved_tensors
        n, T, H, N = B.shape
        K, acc, launch = N // 2, ctx.acc, ctx.launch
        BK = triton.next_power_of_2(K)
        zeros = torch.zeros(n, T, 2 * H, N, device=B.device, dtype=acc)
        dkeys = zeros if dkeys is None else dkeys.contiguous()
        dqueries = zeros if dqueries is None else dqueries.contiguous()
        dangle_last = torch.zeros_like(angle0, dtype=acc) if dangle_last is None else dangle_last.contiguous()
        ddt, dtheta = (torch.empty(shape, device=B.device, dtype=acc) for shape in ((n, T, H), (n, T, H, K)))
        dB, dC = (torch.empty(n, T, H, N, device=B.device, dtype=acc) for _ in range(2))
        dangle0, dprev_B = (torch.empty(shape, device=B.device, dtype=acc) for shape in ((n, H, K), (n, H, N)))
        _frame_bwd_kernel[(n * H,)](
            dt, theta, B, C, dt if starts is None else starts, angle0, prev_B, carries, dkeys, dqueries, dangle_last,
            ddt, dtheta, dB, dC, dangle0, dprev_B, T, H, K, *_strides(dt, theta, B, C),
            HAS_STARTS=starts is not None, BT=launch.block_t, BK=BK,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, num_warps=launch.backward_num_warps)
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
    if dtype is None:
        dtype = torch.float64 if torch.float64 in (dt.dtype, theta.dtype, B.dtype, C.dtype) else torch.float32
    starts = None if document_starts is None else document_starts.to(torch.int8).contiguous()
    return _Frame.apply(dt, theta, B, C, angle0, prev_B, starts, dtype, launch)
