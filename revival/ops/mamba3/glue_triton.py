"""The elementwise glue of the SISO Triton path around SSD's kernels as two Triton kernel pairs, forward + hand-written
backward (GPU; `TRITON_INTERPRET=1` for CPU tests). The PyTorch forms (`*_reference`) are the float64 references.

`two_head_inputs(x, dt, A, lam, prev_x, starts, dtype)`: SSD's 2H-head input (module doc of `triton.py`),

    out[:, t, h] = lam_t x_t,   out[:, t, H + h] = w_t x_{t-1},   w_t = (1 - lam_t) exp(dt_t A_h) (0 at a start),
    x_{-1} = prev_x;

backward: d x_t = lam_t g_t + w_{t+1} g'_{t+1}, d w_t = g'_t . x_{t-1}, d lam_t = g_t . x_t - exp(dt_t A) d w_t
(no w term at a start), d(dt_t A) = w_t d w_t, d prev_x = w_0 g'_0 (g, g' the two heads' gradients).

`combine_heads(y2, x, D)`: y = y2[:, :, :H] + y2[:, :, H:] + D x; backward: both heads get d y, d x = D d y,
d D = sum d y . x.

Why: in PyTorch these were ~10 passes forward and ~15 backward over (n, T, H, P) float32 copies (x cast to float32,
the shifted x by `cat`, two broadcast products, the 2H `cat`, the cast to 16 bits, the two heads' float32 sum and
the skip term), each a full read and write of a 200 MB tensor at 125M / 2k; one pass each way reads x through its
strides, computes in float32 (float64 for float64) and rounds once.
"""

from __future__ import annotations

import torch

from .._common import compute_dtype
from .._triton import HAVE_TRITON, INTERPRET, require_triton
from .chunkwise import previous_weight

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["combine_heads", "combine_heads_reference", "two_head_inputs", "two_head_inputs_reference"]

_ROWS = 16  # (n, t, h) rows a program; P columns each


def two_head_inputs_reference(x, dt, A, lam, prev_x, document_starts, dtype):
    """x (n, T, H, P), dt and lam (n, T, H), A (H,), prev_x (n, H, P) -> (n, T, 2H, P) in `dtype` (module doc)."""
    compute = compute_dtype(x)
    xs, dt, lam = x.to(compute), dt.to(compute), lam.to(compute)
    x_prev = torch.cat([prev_x[:, None].to(compute), xs[:, :-1]], dim=1)
    weight = previous_weight(dt * A.to(compute), lam, document_starts)
    return torch.cat([lam[..., None] * xs, weight[..., None] * x_prev], dim=2).to(dtype)


def combine_heads_reference(y2, x, D):
    """y2 (n, T, 2H, P), x (n, T, H, P), D (H,) or None -> y2's two heads summed plus D x, in x's dtype."""
    compute = compute_dtype(x)
    H = x.shape[2]
    y = y2[:, :, :H].to(compute) + y2[:, :, H:].to(compute)
    if D is not None:
        y = y + D.to(compute)[:, None] * x.to(compute)
    return y.to(x.dtype)


if HAVE_TRITON:

    @triton.jit
    def _rows(total, T, H, BR: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        return r, r < total, r // (H * T), (r // H) % T, r % H

    @triton.jit
    def _weight(dt_ptr, lam_ptr, a_ptr, starts_ptr, n, t, h, valid, T, sdt_n, sdt_t, sdt_h, sl_n, sl_t, sl_h,
                HAS_STARTS: tl.constexpr, ACC: tl.constexpr):
        """lam_t, exp(dt_t A_h) and w_t = (1 - lam_t) exp(dt_t A_h) (0 at a start) for the rows' (n, t, h)."""
        dt = tl.load(dt_ptr + n * sdt_n + t * sdt_t + h * sdt_h, mask=valid, other=0.0).to(ACC)
        lam = tl.load(lam_ptr + n * sl_n + t * sl_t + h * sl_h, mask=valid, other=0.0).to(ACC)
        decay = tl.exp(dt * tl.load(a_ptr + h, mask=valid, other=0.0).to(ACC))
        keep = tl.full(t.shape, 1.0, ACC)
        if HAS_STARTS:
            keep = tl.where(tl.load(starts_ptr + n * T + t, mask=valid, other=0) != 0, 0.0, keep)
        return lam, decay * keep, (1 - lam) * decay * keep

    @triton.jit
    def _load_x(x_ptr, prev_ptr, n, t, h, cols, mask, H, P, sx_n, sx_t, sx_h, sx_p, ACC: tl.constexpr):
        """x_t and x_{t-1} (prev_x at t = 0) on the rows, (BR, BP)."""
        base = x_ptr + (n * sx_n + h * sx_h)[:, None] + cols[None, :] * sx_p
        x = tl.load(base + t[:, None] * sx_t, mask=mask, other=0.0).to(ACC)
        xp = tl.load(base + (t[:, None] - 1) * sx_t, mask=mask & (t > 0)[:, None], other=0.0).to(ACC)
        xp += tl.load(prev_ptr + ((n * H + h) * P)[:, None] + cols[None, :], mask=mask & (t == 0)[:, None],
                      other=0.0).to(ACC)
        return x, xp

    @triton.jit
    def _inputs_fwd_kernel(x_ptr, dt_ptr, lam_ptr, a_ptr, prev_ptr, starts_ptr, out_ptr, total, T, H, P,
                           sx_n, sx_t, sx_h, sx_p, sdt_n, sdt_t, sdt_h, sl_n, sl_t, sl_h,
                           HAS_STARTS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr):
        r, valid, n, t, h = _rows(total, T, H, BR)
        cols = tl.arange(0, BP)
        mask = valid[:, None] & (cols < P)[None, :]
        x, xp = _load_x(x_ptr, prev_ptr, n, t, h, cols, mask, H, P, sx_n, sx_t, sx_h, sx_p, ACC)
        lam, _, w = _weight(dt_ptr, lam_ptr, a_ptr, starts_ptr, n, t, h, valid, T, sdt_n, sdt_t, sdt_h,
                            sl_n, sl_t, sl_h, HAS_STARTS, ACC)
        out = out_ptr + (((n * T + t) * 2 * H + h) * P)[:, None] + cols[None, :]
        tl.store(out, (lam[:, None] * x).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out + H * P, (w[:, None] * xp).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _inputs_bwd_kernel(x_ptr, dt_ptr, lam_ptr, a_ptr, prev_ptr, starts_ptr, g_ptr, dx_ptr, dlam_ptr,
                           dlog_ptr, dprev_ptr, total, T, H, P,
                           sx_n, sx_t, sx_h, sx_p, sdt_n, sdt_t, sdt_h, sl_n, sl_t, sl_h,
                           HAS_STARTS: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr):
        r, valid, n, t, h = _rows(total, T, H, BR)
        cols = tl.arange(0, BP)
        mask = valid[:, None] & (cols < P)[None, :]
        x, xp = _load_x(x_ptr, prev_ptr, n, t, h, cols, mask, H, P, sx_n, sx_t, sx_h, sx_p, ACC)
        lam, decay, w = _weight(dt_ptr, lam_ptr, a_ptr, starts_ptr, n, t, h, valid, T, sdt_n, sdt_t, sdt_h,
                                sl_n, sl_t, sl_h, HAS_STARTS, ACC)
        has_next = valid & (t + 1 < T)
        _, _, w_next = _weight(dt_ptr, lam_ptr, a_ptr, starts_ptr, n, t + 1, h, has_next, T, sdt_n, sdt_t, sdt_h,
                               sl_n, sl_t, sl_h, HAS_STARTS, ACC)
        g = g_ptr + (((n * T + t) * 2 * H + h) * P)[:, None] + cols[None, :]
        g_cur = tl.load(g, mask=mask, other=0.0).to(ACC)
        g_prev = tl.load(g + H * P, mask=mask, other=0.0).to(ACC)
        g_next = tl.load(g + (2 * H + H) * P, mask=mask & has_next[:, None], other=0.0).to(ACC)  # t + 1, H + h
        dx = lam[:, None] * g_cur + w_next[:, None] * g_next
        tl.store(dx_ptr + (((n * T + t) * H + h) * P)[:, None] + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        dw = tl.sum(g_prev * xp, axis=1)
        tl.store(dlam_ptr + r, tl.sum(g_cur * x, axis=1) - decay * dw, mask=valid)
        tl.store(dlog_ptr + r, w * dw, mask=valid)
        tl.store(dprev_ptr + ((n * H + h) * P)[:, None] + cols[None, :], w[:, None] * g_prev,
                 mask=mask & (t == 0)[:, None])

    @triton.jit
    def _combine_fwd_kernel(y2_ptr, x_ptr, d_ptr, out_ptr, total, T, H, P, sx_n, sx_t, sx_h, sx_p,
                            HAS_D: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr):
        r, valid, n, t, h = _rows(total, T, H, BR)
        cols = tl.arange(0, BP)
        mask = valid[:, None] & (cols < P)[None, :]
        y2 = y2_ptr + (((n * T + t) * 2 * H + h) * P)[:, None] + cols[None, :]
        y = tl.load(y2, mask=mask, other=0.0).to(ACC) + tl.load(y2 + H * P, mask=mask, other=0.0).to(ACC)
        if HAS_D:
            x = tl.load(x_ptr + (n * sx_n + t * sx_t + h * sx_h)[:, None] + cols[None, :] * sx_p, mask=mask,
                        other=0.0).to(ACC)
            y += tl.load(d_ptr + h, mask=valid, other=0.0).to(ACC)[:, None] * x
        tl.store(out_ptr + (r * P)[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd_kernel(g_ptr, x_ptr, d_ptr, dy2_ptr, dx_ptr, dd_ptr, total, T, H, P, sx_n, sx_t, sx_h, sx_p,
                            HAS_D: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr, ACC: tl.constexpr):
        r, valid, n, t, h = _rows(total, T, H, BR)
        cols = tl.arange(0, BP)
        mask = valid[:, None] & (cols < P)[None, :]
        g = tl.load(g_ptr + (r * P)[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy2 = dy2_ptr + (((n * T + t) * 2 * H + h) * P)[:, None] + cols[None, :]
        tl.store(dy2, g.to(dy2_ptr.dtype.element_ty), mask=mask)
        tl.store(dy2 + H * P, g.to(dy2_ptr.dtype.element_ty), mask=mask)
        if HAS_D:
            x = tl.load(x_ptr + (n * sx_n + t * sx_t + h * sx_h)[:, None] + cols[None, :] * sx_p, mask=mask,
                        other=0.0).to(ACC)
            dx = tl.load(d_ptr + h, mask=valid, other=0.0).to(ACC)[:, None] * g
            tl.store(dx_ptr + (r * P)[:, None] + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(dd_ptr + r, tl.sum(g * x, axis=1), mask=valid)


def _acc(*tensors) -> tuple[torch.dtype, object]:
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    return acc, tl.float64 if acc == torch.float64 else tl.float32


def _empty(shape, dtype, device) -> torch.Tensor:
    """An output buffer; float32 for a 16-bit result under the interpreter, whose float32 -> 16-bit stores truncate
    (triton 3.9 ignores the rounding mode there), so the CPU tests round to nearest as the GPU kernels do."""
    if INTERPRET and dtype in (torch.bfloat16, torch.float16):
        dtype = torch.float32
    return torch.empty(shape, device=device, dtype=dtype)


def _grid(total: int) -> tuple[int]:
    return (triton.cdiv(total, _ROWS),)


class _TwoHeadInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, lam, prev_x, starts, dtype):
        n, T, H, P = x.shape
        acc, ACC = _acc(x, dt, A, lam, prev_x)
        prev_x, A = prev_x.contiguous(), A.contiguous()
        out = _empty((n, T, 2 * H, P), dtype, x.device)
        _inputs_fwd_kernel[_grid(n * T * H)](
            x, dt, lam, A, prev_x, dt if starts is None else starts, out, n * T * H, T, H, P,
            *x.stride(), *dt.stride(), *lam.stride(), HAS_STARTS=starts is not None, BR=_ROWS,
            BP=triton.next_power_of_2(P), ACC=ACC)
        ctx.save_for_backward(x, dt, A, lam, prev_x, starts)
        ctx.acc, ctx.ACC = acc, ACC
        return out.to(dtype)

    @staticmethod
    def backward(ctx, g):
        x, dt, A, lam, prev_x, starts = ctx.saved_tensors
        n, T, H, P = x.shape
        acc = ctx.acc
        dx = _empty((n, T, H, P), x.dtype, x.device)
        dlam, dlog = (torch.empty(n, T, H, device=x.device, dtype=acc) for _ in range(2))
        dprev = torch.empty(n, H, P, device=x.device, dtype=acc)
        _inputs_bwd_kernel[_grid(n * T * H)](
            x, dt, lam, A, prev_x, dt if starts is None else starts, g.contiguous(), dx, dlam, dlog, dprev,
            n * T * H, T, H, P, *x.stride(), *dt.stride(), *lam.stride(), HAS_STARTS=starts is not None, BR=_ROWS,
            BP=triton.next_power_of_2(P), ACC=ctx.ACC)
        ddt = dlog * A.to(acc)  # d(dt A) -> dt and A
        dA = (dlog * dt.to(acc)).sum(dim=(0, 1))
        return (dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dlam.to(lam.dtype), dprev.to(prev_x.dtype), None,
                None)


class _CombineHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y2, x, D):
        n, T, H, P = x.shape
        _, ACC = _acc(y2, x, *(() if D is None else (D,)))
        y2 = y2.contiguous()
        out = _empty((n, T, H, P), x.dtype, x.device)
        _combine_fwd_kernel[_grid(n * T * H)](
            y2, x, y2 if D is None else D, out, n * T * H, T, H, P, *x.stride(), HAS_D=D is not None, BR=_ROWS,
            BP=triton.next_power_of_2(P), ACC=ACC)
        ctx.save_for_backward(x, D)
        ctx.y2_dtype, ctx.ACC = y2.dtype, ACC
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, D = ctx.saved_tensors
        n, T, H, P = x.shape
        g = g.contiguous()
        dy2 = _empty((n, T, 2 * H, P), ctx.y2_dtype, x.device)
        dx = _empty((n, T, H, P), x.dtype, x.device) if D is not None else None
        dD = torch.empty(n, T, H, device=x.device, dtype=torch.float64 if ctx.ACC == tl.float64 else torch.float32)
        _combine_bwd_kernel[_grid(n * T * H)](
            g, x, g if D is None else D, dy2, g if dx is None else dx, dD, n * T * H, T, H, P, *x.stride(),
            HAS_D=D is not None, BR=_ROWS, BP=triton.next_power_of_2(P), ACC=ctx.ACC)
        dD = None if D is None else dD.sum(dim=(0, 1)).to(D.dtype)
        return dy2.to(ctx.y2_dtype), None if dx is None else dx.to(x.dtype), dD


def two_head_inputs(x, dt, A, lam, prev_x, document_starts=None, *, dtype=None) -> torch.Tensor:
    """SSD's 2H-head input (module doc): x (n, T, H, P) any strides, dt and lam (n, T, H), A (H,), prev_x (n, H, P),
    document_starts (n, T) bool or None (validated by the caller) -> (n, T, 2H, P) in `dtype` (None: x's dtype);
    differentiable in x, dt, A, lam and prev_x."""
    require_triton()
    n, T, H, P = x.shape
    for name, tensor, shape in (("dt", dt, (n, T, H)), ("lam", lam, (n, T, H)), ("A", A, (H,)),
                                ("prev_x", prev_x, (n, H, P))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
    starts = None if document_starts is None else document_starts.to(torch.int8).contiguous()
    return _TwoHeadInputs.apply(x, dt, A, lam, prev_x, starts, x.dtype if dtype is None else dtype)


def combine_heads(y2, x, D=None) -> torch.Tensor:
    """y2[:, :, :H] + y2[:, :, H:] + D x (module doc): y2 (n, T, 2H, P), x (n, T, H, P) any strides, D (H,) or None
    -> (n, T, H, P) in x's dtype; differentiable in y2, x and D."""
    require_triton()
    n, T, H, P = x.shape
    if tuple(y2.shape) != (n, T, 2 * H, P):
        raise ValueError(f"y2: expected shape {(n, T, 2 * H, P)} (two heads per x head), got {tuple(y2.shape)}")
    if D is not None and tuple(D.shape) != (H,):
        raise ValueError(f"D: expected shape {(H,)}, got {tuple(D.shape)}")
    return _CombineHeads.apply(y2, x, D)
