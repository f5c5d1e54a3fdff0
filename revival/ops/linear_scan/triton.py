"""Fused Triton scans for h_t = a_t h_{t-1} + b_t over (B, T, D) channels, forward and backward (GPU).

Two ways in, both behind `torch.autograd.Function`s, all computing in float32 in linear space:

- `linear_recurrence_triton(a, b, h0)`: the bare recurrence, a and b given (B, T, D).
- `mingru_scan_triton(gate, hidden, h0)` / `minlstm_scan_triton(forget, input, hidden, h0)`: the gate math is fused
  into the kernel (minGRU a = sigmoid(-gate), b = sigmoid(gate) g(hidden); minLSTM d = softplus(-forget) -
  softplus(-input), a = f/(f+i) = sigmoid(-d), b = sigmoid(d) g(hidden)), so no (a, b) tensors are written.

Kernels: one program per (block of BD channels, batch row); it walks the time axis in tiles of BT steps, loads a
(BT, BD) tile (channels contiguous), solves the tile with `tl.associative_scan` over (a, b) pairs, combine
(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2), and carries the last row into the next tile. The backward kernel walks
the tiles from the end: the state gradient obeys the reversed recurrence g_t = dh_t + a_{t+1} g_{t+1} (g_{T-1} gets
dh_last too), then da_t = g_t h_{t-1}, db_t = g_t, dh0 = a_0 g_0, chained through the gate math.

Shapes: inputs (B, T, D) (any strides with the channel stride 1; all inputs of one call share their strides),
h0 (B, D) or None. Returns (h (B, T, D) in the input dtype, h_last (B, D) float32). `available()` says whether the
kernels can run (Triton importable; CUDA, or TRITON_INTERPRET=1 set before Triton is imported). `launch`: tile
sizes and warps (`LaunchConfig`); results do not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._triton import HAVE_TRITON, available

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .._triton import linear_recurrence_combine

__all__ = ["LaunchConfig", "available", "linear_recurrence_triton", "mingru_scan_triton", "minlstm_scan_triton"]

LINEAR, MINGRU, MINLSTM = 0, 1, 2  # kernel modes; the number of inputs is 2, 2, 3


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles (time steps x channels) and warps per program of the scan kernels; chosen on an H100 (docs/kernels.md).
    The same for every shape: a program walks all of T in tiles, so only the channel count sets the grid."""

    block_t: int = 32
    block_d: int = 32
    num_warps: int = 4
    backward_block_t: int = 16
    backward_block_d: int = 32
    backward_num_warps: int = 4


if HAVE_TRITON:

    @triton.jit
    def _softplus(x):
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _g(x):
        return tl.where(x >= 0, x + 0.5, tl.sigmoid(x))

    @triton.jit
    def _g_prime(x):
        s = tl.sigmoid(x)
        return tl.where(x >= 0, 1.0, s * (1.0 - s))

    @triton.jit
    def _coefficients(x1, x2, x3, MODE: tl.constexpr):
        """(a, b) of the recurrence from the inputs of one tile (float32)."""
        if MODE == 0:
            return x1, x2
        elif MODE == 1:
            return tl.sigmoid(-x1), tl.sigmoid(x1) * _g(x2)
        else:
            d = _softplus(-x1) - _softplus(-x2)
            return tl.sigmoid(-d), tl.sigmoid(d) * _g(x3)

    @triton.jit
    def _load_inputs(x1_ptr, x2_ptr, x3_ptr, off, mask, MODE: tl.constexpr):
        x1 = tl.load(x1_ptr + off, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x2_ptr + off, mask=mask, other=0.0).to(tl.float32)
        x3 = x2
        if MODE == 2:
            x3 = tl.load(x3_ptr + off, mask=mask, other=0.0).to(tl.float32)
        return x1, x2, x3

    @triton.jit
    def scan_tile(a, b, mask, carry, rows, BT: tl.constexpr):
        """Solve one (BT, BD) tile from the state `carry` (BD,); returns (h tile, new carry)."""
        a = tl.where(mask, a, 1.0)
        b = tl.where(mask, b, 0.0)
        a_cum, b_cum = tl.associative_scan((a, b), 0, linear_recurrence_combine)
        h = a_cum * carry[None, :] + b_cum
        return h, tl.sum(tl.where(rows[:, None] == BT - 1, h, 0.0), axis=0)

    @triton.jit
    def _scan_fwd_kernel(x1_ptr, x2_ptr, x3_ptr, h0_ptr, h_ptr, h_last_ptr, T, D, sx_b, sx_t, sh_b, sh_t,
                         MODE: tl.constexpr, HAS_H0: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        cols = tl.program_id(0) * BD + tl.arange(0, BD)
        batch = tl.program_id(1).to(tl.int64)
        cmask, rows = cols < D, tl.arange(0, BT)
        carry = tl.zeros([BD], dtype=tl.float32)
        if HAS_H0:
            carry = tl.load(h0_ptr + batch * D + cols, mask=cmask, other=0.0).to(tl.float32)
        x_base = batch * sx_b + cols[None, :]
        # software pipelining by hand: the loads of tile k+1 are issued before tile k is scanned
        n1, n2, n3 = _load_inputs(x1_ptr, x2_ptr, x3_ptr, x_base + rows[:, None] * sx_t,
                                  (rows < T)[:, None] & cmask[None, :], MODE)
        for t0 in range(0, T, BT):
            x1, x2, x3 = n1, n2, n3
            t = t0 + rows
            mask = (t < T)[:, None] & cmask[None, :]
            n1, n2, n3 = _load_inputs(x1_ptr, x2_ptr, x3_ptr, x_base + (t + BT)[:, None] * sx_t,
                                      (t + BT < T)[:, None] & cmask[None, :], MODE)
            a, b = _coefficients(x1, x2, x3, MODE)
            h, carry = scan_tile(a, b, mask, carry, rows, BT)
            tl.store(h_ptr + batch * sh_b + t[:, None] * sh_t + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_last_ptr + batch * D + cols, carry, mask=cmask)

    @triton.jit
    def _bwd_tile_loads(x1_ptr, x2_ptr, x3_ptr, h_ptr, dh_ptr, x_base, h_base, t, T, sx_t, sh_t, cmask,
                        MODE: tl.constexpr):
        """The tiles the backward needs at times t (BT,): inputs at t + 1, dh_t, h_{t-1}, inputs at t (float32)."""
        mask = (t >= 0)[:, None] & cmask[None, :]
        y1, y2, y3 = _load_inputs(x1_ptr, x2_ptr, x3_ptr, x_base + (t + 1)[:, None] * sx_t,
                                  (t + 1 < T)[:, None] & mask, MODE)
        dh = tl.load(dh_ptr + h_base + t[:, None] * sh_t, mask=mask, other=0.0).to(tl.float32)
        h_prev = tl.load(h_ptr + h_base + (t - 1)[:, None] * sh_t, mask=(t >= 1)[:, None] & mask,
                         other=0.0).to(tl.float32)
        x1, x2, x3 = _load_inputs(x1_ptr, x2_ptr, x3_ptr, x_base + t[:, None] * sx_t, mask, MODE)
        return y1, y2, y3, dh, h_prev, x1, x2, x3

    @triton.jit
    def _scan_bwd_kernel(x1_ptr, x2_ptr, x3_ptr, h0_ptr, h_ptr, dh_ptr, dh_last_ptr, d1_ptr, d2_ptr, d3_ptr,
                         dh0_ptr, T, D, sx_b, sx_t, sh_b, sh_t, sd_b, sd_t, MODE: tl.constexpr,
                         HAS_H0: tl.constexpr, HAS_DH_LAST: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        cols = tl.program_id(0) * BD + tl.arange(0, BD)
        batch = tl.program_id(1).to(tl.int64)
        cmask, rows = cols < D, tl.arange(0, BT)
        carry = tl.zeros([BD], dtype=tl.float32)  # g_{t0+BT}: the state gradient entering the tile from the right
        if HAS_DH_LAST:
            carry = tl.load(dh_last_ptr + batch * D + cols, mask=cmask, other=0.0).to(tl.float32)
        h0 = tl.zeros([BD], dtype=tl.float32)
        if HAS_H0:
            h0 = tl.load(h0_ptr + batch * D + cols, mask=cmask, other=0.0).to(tl.float32)
        x_base = batch * sx_b + cols[None, :]
        h_base = batch * sh_b + cols[None, :]
        n1, n2, n3, n4, n5, n6, n7, n8 = _bwd_tile_loads(x1_ptr, x2_ptr, x3_ptr, h_ptr, dh_ptr, x_base, h_base,
                                                         T - 1 - rows, T, sx_t, sh_t, cmask, MODE)
        for tile in range(0, tl.cdiv(T, BT)):
            t = T - 1 - tile * BT - rows  # descending time: the scan runs backwards
            y1, y2, y3, dh, h_prev, x1, x2, x3 = n1, n2, n3, n4, n5, n6, n7, n8
            n1, n2, n3, n4, n5, n6, n7, n8 = _bwd_tile_loads(x1_ptr, x2_ptr, x3_ptr, h_ptr, dh_ptr, x_base, h_base,
                                                             t - BT, T, sx_t, sh_t, cmask, MODE)  # next tile (left)
            mask = (t >= 0)[:, None] & cmask[None, :]
            next_mask = (t + 1 < T)[:, None] & mask
            a_next, _ = _coefficients(y1, y2, y3, MODE)
            a_next = tl.where(next_mask, a_next, 1.0)
            g, carry = scan_tile(a_next, dh, mask, carry, rows, BT)
            h_prev = tl.where((t == 0)[:, None], h0[None, :], h_prev)
            if MODE == 0:
                d1, d2, d3 = g * h_prev, g, g
            elif MODE == 1:
                z = tl.sigmoid(x1)
                d1 = z * tl.sigmoid(-x1) * g * (_g(x2) - h_prev)
                d2 = g * z * _g_prime(x2)
                d3 = d2
            else:
                d = _softplus(-x1) - _softplus(-x2)
                i_norm = tl.sigmoid(d)
                dd = tl.sigmoid(-d) * i_norm * g * (_g(x3) - h_prev)
                d1 = -tl.sigmoid(-x1) * dd
                d2 = tl.sigmoid(-x2) * dd
                d3 = g * i_norm * _g_prime(x3)
            d_off = batch * sd_b + t[:, None] * sd_t + cols[None, :]
            tl.store(d1_ptr + d_off, d1.to(d1_ptr.dtype.element_ty), mask=mask)
            tl.store(d2_ptr + d_off, d2.to(d2_ptr.dtype.element_ty), mask=mask)
            if MODE == 2:
                tl.store(d3_ptr + d_off, d3.to(d3_ptr.dtype.element_ty), mask=mask)
        if HAS_H0:  # carry is g_0 now; dh0 = a_0 g_0
            zero = tl.arange(0, 1)[:, None] * 0
            x1, x2, x3 = _load_inputs(x1_ptr, x2_ptr, x3_ptr, x_base + zero, cmask[None, :], MODE)
            a0, _ = _coefficients(x1, x2, x3, MODE)
            tl.store(dh0_ptr + batch * D + cols, tl.sum(a0, axis=0) * carry, mask=cmask)


# ----------------------------------------------------------------------------------------------- launches
def _same_strides(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs share (batch, time) strides and have channel stride 1; otherwise make them contiguous."""
    first = tensors[0]
    if all(x.stride(-1) == 1 and x.stride()[:2] == first.stride()[:2] for x in tensors):
        return tensors
    return [x.contiguous() for x in tensors]


def _scan_forward(inputs: list[torch.Tensor], h0: torch.Tensor | None, mode: int, launch: LaunchConfig):
    B, T, D = inputs[0].shape
    x1, x2, x3 = (inputs + inputs[:1])[:3]
    h = torch.empty(B, T, D, dtype=x1.dtype, device=x1.device)
    h_last = torch.empty(B, D, dtype=torch.float32, device=x1.device)
    grid = (triton.cdiv(D, launch.block_d), B)
    _scan_fwd_kernel[grid](x1, x2, x3, h_last if h0 is None else h0, h, h_last, T, D, x1.stride(0), x1.stride(1),
                           T * D, D, MODE=mode, HAS_H0=h0 is not None, BT=launch.block_t, BD=launch.block_d,
                           num_warps=launch.num_warps)
    return h, h_last


def _scan_backward(inputs, grads, h0, h, dh, dh_last, mode: int, launch: LaunchConfig) -> torch.Tensor | None:
    """Fill `grads` (tensors like `inputs`, sharing strides) from dh (B, T, D) and dh_last; returns dh0 (float32)."""
    B, T, D = h.shape
    x1, x2, x3 = (inputs + inputs[:1])[:3]
    d1, d2, d3 = (grads + grads[:1])[:3]
    dh = torch.zeros_like(h) if dh is None else dh.contiguous()
    dh0 = None if h0 is None else torch.empty(B, D, dtype=torch.float32, device=h.device)
    grid = (triton.cdiv(D, launch.backward_block_d), B)
    _scan_bwd_kernel[grid](x1, x2, x3, h if h0 is None else h0, h, dh, h if dh_last is None else dh_last.contiguous(),
                           d1, d2, d3, h if dh0 is None else dh0, T, D, x1.stride(0), x1.stride(1), T * D, D,
                           d1.stride(0), d1.stride(1), MODE=mode, HAS_H0=h0 is not None,
                           HAS_DH_LAST=dh_last is not None, BT=launch.backward_block_t,
                           BD=launch.backward_block_d, num_warps=launch.backward_num_warps)
    return dh0


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode, launch, h0, *inputs):
        inputs = _same_strides(list(inputs))
        h0 = None if h0 is None else h0.contiguous()
        h, h_last = _scan_forward(inputs, h0, mode, launch)
        ctx.mode, ctx.launch = mode, launch
        ctx.save_for_backward(h0, h, *inputs)
        return h, h_last

    @staticmethod
    def backward(ctx, dh, dh_last):
        h0, h, *inputs = ctx.saved_tensors
        grads = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]
        dh0 = _scan_backward(inputs, grads, h0, h, dh, dh_last, ctx.mode, ctx.launch)
        return None, None, None if dh0 is None else dh0.to(h0.dtype), *grads


# ----------------------------------------------------------------------------------------------- entry points
def _check(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], h0: torch.Tensor | None,
           launch: LaunchConfig | None) -> LaunchConfig:
    """Validate the inputs; returns the launch config (the defaults for None)."""
    if not available():
        raise RuntimeError("the Triton scan needs the `triton` package and a CUDA device (or TRITON_INTERPRET=1)")
    first = tensors[0]
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name}: expected a float32/float16/bfloat16 tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 3 or x.shape[1] == 0 or x.shape != first.shape:
            raise ValueError(f"{name}: expected shape (B, T >= 1, D) equal to {names[0]}'s {tuple(first.shape)}, "
                             f"got {tuple(x.shape)}")
    if h0 is not None and tuple(h0.shape) != (first.shape[0], first.shape[2]):
        raise ValueError(f"h0: expected shape {(first.shape[0], first.shape[2])}, got {tuple(h0.shape)}")
    if launch is not None and not isinstance(launch, LaunchConfig):
        raise ValueError(f"launch: expected a LaunchConfig or None, got {type(launch).__name__}")
    return LaunchConfig() if launch is None else launch


def linear_recurrence_triton(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, *,
                             launch: LaunchConfig | None = None):
    """h_t = a_t h_{t-1} + b_t. a, b: (B, T, D); h0: (B, D) or None. -> (h (B, T, D), h_last (B, D) float32)."""
    launch = _check(("a", "b"), (a, b), h0, launch)
    return _Scan.apply(LINEAR, launch, h0, a, b)


def mingru_scan_triton(gate: torch.Tensor, hidden: torch.Tensor, h0: torch.Tensor | None = None, *,
                       launch: LaunchConfig | None = None):
    """minGRU from pre-activations gate, hidden (B, T, D); h0 (B, D) or None. -> (h, h_last float32)."""
    launch = _check(("gate", "hidden"), (gate, hidden), h0, launch)
    return _Scan.apply(MINGRU, launch, h0, gate, hidden)


def minlstm_scan_triton(forget: torch.Tensor, input: torch.Tensor, hidden: torch.Tensor,
                        h0: torch.Tensor | None = None, *, launch: LaunchConfig | None = None):
    """minLSTM from pre-activations forget, input, hidden (B, T, D); h0 (B, D) or None. -> (h, h_last float32)."""
    launch = _check(("forget", "input", "hidden"), (forget, input, hidden), h0, launch)
    return _Scan.apply(MINLSTM, launch, h0, forget, input, hidden)
