"""Fused Triton scans for h_t = a_t h_{t-1} + b_t over (B, T, D) channels, forward and backward (GPU).

Three ways in, all behind `torch.autograd.Function`s, all computing in float32 in linear space:

- `linear_recurrence_triton(a, b, h0)`: the bare recurrence, a and b given (B, T, D).
- `mingru_scan_triton(gate, hidden, h0)` / `minlstm_scan_triton(forget, input, hidden, h0)`: the gate math is fused
  into the kernel (minGRU a = sigmoid(-gate), b = sigmoid(gate) g(hidden); minLSTM d = softplus(-forget) -
  softplus(-input), a = f/(f+i) = sigmoid(-d), b = sigmoid(d) g(hidden)), so no (a, b) tensors are written.
- `projected_scan_triton(u, weight, bias, h0, mode, roles)`: also fuses the in-projection (u @ weight^T + bias, by
  `tl.dot`) into the forward kernel: it reads u (B, T, K) and writes h, nothing else. The backward recomputes the
  pre-activations with one matmul, runs the backward scan kernel, then two matmuls for du and dweight.

Kernels: one program per (block of BD channels, batch row); it walks the time axis in tiles of BT steps, loads a
(BT, BD) tile (channels contiguous), solves the tile with `tl.associative_scan` over (a, b) pairs, combine
(a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2), and carries the last row into the next tile. The backward kernel walks
the tiles from the end: the state gradient obeys the reversed recurrence g_t = dh_t + a_{t+1} g_{t+1} (g_{T-1} gets
dh_last too), then da_t = g_t h_{t-1}, db_t = g_t, dh0 = a_0 g_0, chained through the gate math.

Shapes: inputs (B, T, D) (any strides with the channel stride 1; all inputs of one call share their strides),
h0 (B, D) or None. Returns (h (B, T, D) in the input dtype, h_last (B, D) float32). `available()` says whether the
kernels can run (Triton importable; CUDA, or TRITON_INTERPRET=1 set before this module is imported).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    _HAVE_TRITON = False

__all__ = ["available", "linear_recurrence_triton", "mingru_scan_triton", "minlstm_scan_triton",
           "projected_scan_triton", "LINEAR", "MINGRU", "MINLSTM"]

LINEAR, MINGRU, MINLSTM = 0, 1, 2  # kernel modes; the number of inputs is 2, 2, 3
NUM_INPUTS = {LINEAR: 2, MINGRU: 2, MINLSTM: 3}
# Tiles (time steps BT x channels BD, reduction BK) and warps per program; chosen on an H100 (benchmarks/NOTES.md).
SCAN_BLOCKS = {"BT": 32, "BD": 32, "num_warps": 4}  # forward scan kernel
BWD_BLOCKS = {"BT": 16, "BD": 32, "num_warps": 4}  # backward scan kernel
PROJ_BLOCKS = {  # fused in-projection + scan, by tl.dot precision
    "tf32": {"BT": 128, "BD": 32, "BK": 32, "num_warps": 4},
    "ieee": {"BT": 64, "BD": 64, "BK": 32, "num_warps": 4},
}


# Whether the layers fuse the in-projection into the scan kernel, by dtype / tl.dot precision (float32 inputs:
# "tf32" when torch allows TF32 matmuls, else "ieee"); otherwise they run cuBLAS, then the scan kernel. On an H100
# (B=64, T=4096, D=256) cuBLAS + scan won in both float32 modes (TF32: 0.66 vs 0.71 ms; strict: 1.8 vs 5.0 ms);
# half precision was not measured, so it takes the same path.
FUSE_PROJECTION = {"tf32": False, "ieee": False, "half": False}


def fuse_projection(dtype: torch.dtype) -> bool:
    """Whether the fused projection + scan kernel is the faster path for inputs of `dtype` (see FUSE_PROJECTION)."""
    return FUSE_PROJECTION["half" if dtype in (torch.float16, torch.bfloat16) else _matmul_precision()]


def available() -> bool:
    return _HAVE_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if _HAVE_TRITON:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

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
    def _scan_tile(a, b, mask, carry, rows, BT: tl.constexpr):
        """Solve one (BT, BD) tile from the state `carry` (BD,); returns (h tile, new carry)."""
        a = tl.where(mask, a, 1.0)
        b = tl.where(mask, b, 0.0)
        a_cum, b_cum = tl.associative_scan((a, b), 0, _combine)
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
            h, carry = _scan_tile(a, b, mask, carry, rows, BT)
            tl.store(h_ptr + batch * sh_b + t[:, None] * sh_t + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_last_ptr + batch * D + cols, carry, mask=cmask)

    @triton.jit
    def _proj_scan_fwd_kernel(u_ptr, w_ptr, bias_ptr, h0_ptr, h_ptr, h_last_ptr, T, K, D, su_b, su_t, sw_n,
                              sh_b, sh_t, ROW1, ROW2, ROW3, MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                              HAS_H0: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                              BK: tl.constexpr):
        """As `_scan_fwd_kernel`, the inputs computed in-tile as u @ weight[ROWi + cols]^T (+ bias)."""
        cols = tl.program_id(0) * BD + tl.arange(0, BD)
        batch = tl.program_id(1).to(tl.int64)
        cmask, rows, ks = cols < D, tl.arange(0, BT), tl.arange(0, BK)
        carry = tl.zeros([BD], dtype=tl.float32)
        if HAS_H0:
            carry = tl.load(h0_ptr + batch * D + cols, mask=cmask, other=0.0).to(tl.float32)
        for t0 in range(0, T, BT):
            t = t0 + rows
            mask = (t < T)[:, None] & cmask[None, :]
            x1 = tl.zeros([BT, BD], dtype=tl.float32)
            x2 = tl.zeros([BT, BD], dtype=tl.float32)
            x3 = tl.zeros([BT, BD], dtype=tl.float32)
            for k0 in range(0, K, BK):
                k = k0 + ks
                kmask = k < K
                u = tl.load(u_ptr + batch * su_b + t[:, None] * su_t + k[None, :],
                            mask=(t < T)[:, None] & kmask[None, :], other=0.0)
                w_off = cols[None, :] * sw_n + k[:, None]
                w_mask = cmask[None, :] & kmask[:, None]
                x1 = tl.dot(u, tl.load(w_ptr + ROW1 * sw_n + w_off, mask=w_mask, other=0.0), x1,
                            input_precision=PRECISION)
                x2 = tl.dot(u, tl.load(w_ptr + ROW2 * sw_n + w_off, mask=w_mask, other=0.0), x2,
                            input_precision=PRECISION)
                if MODE == 2:
                    x3 = tl.dot(u, tl.load(w_ptr + ROW3 * sw_n + w_off, mask=w_mask, other=0.0), x3,
                                input_precision=PRECISION)
            if HAS_BIAS:
                x1 += tl.load(bias_ptr + ROW1 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                x2 += tl.load(bias_ptr + ROW2 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
                if MODE == 2:
                    x3 += tl.load(bias_ptr + ROW3 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            a, b = _coefficients(x1, x2, x3, MODE)
            h, carry = _scan_tile(a, b, mask, carry, rows, BT)
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
            g, carry = _scan_tile(a_next, dh, mask, carry, rows, BT)
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
def _matmul_precision() -> str:
    """tl.dot precision following torch's float32 matmul setting (TF32 only where torch would use it)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _same_strides(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs share (batch, time) strides and have channel stride 1; otherwise make them contiguous."""
    first = tensors[0]
    if all(x.stride(-1) == 1 and x.stride()[:2] == first.stride()[:2] for x in tensors):
        return tensors
    return [x.contiguous() for x in tensors]


def _scan_forward(inputs: list[torch.Tensor], h0: torch.Tensor | None, mode: int):
    B, T, D = inputs[0].shape
    x1, x2, x3 = (inputs + inputs[:1])[:3]
    h = torch.empty(B, T, D, dtype=x1.dtype, device=x1.device)
    h_last = torch.empty(B, D, dtype=torch.float32, device=x1.device)
    blocks = SCAN_BLOCKS
    grid = (triton.cdiv(D, blocks["BD"]), B)
    _scan_fwd_kernel[grid](x1, x2, x3, h_last if h0 is None else h0, h, h_last, T, D, x1.stride(0), x1.stride(1),
                           T * D, D, MODE=mode, HAS_H0=h0 is not None, BT=blocks["BT"], BD=blocks["BD"],
                           num_warps=blocks["num_warps"])
    return h, h_last


def _scan_backward(inputs, grads, h0, h, dh, dh_last, mode: int) -> torch.Tensor | None:
    """Fill `grads` (tensors like `inputs`, sharing strides) from dh (B, T, D) and dh_last; returns dh0 (float32)."""
    B, T, D = h.shape
    x1, x2, x3 = (inputs + inputs[:1])[:3]
    d1, d2, d3 = (grads + grads[:1])[:3]
    dh = torch.zeros_like(h) if dh is None else dh.contiguous()
    dh0 = None if h0 is None else torch.empty(B, D, dtype=torch.float32, device=h.device)
    blocks = BWD_BLOCKS
    grid = (triton.cdiv(D, blocks["BD"]), B)
    _scan_bwd_kernel[grid](x1, x2, x3, h if h0 is None else h0, h, dh, h if dh_last is None else dh_last.contiguous(),
                           d1, d2, d3, h if dh0 is None else dh0, T, D, x1.stride(0), x1.stride(1), T * D, D,
                           d1.stride(0), d1.stride(1), MODE=mode, HAS_H0=h0 is not None,
                           HAS_DH_LAST=dh_last is not None, BT=blocks["BT"], BD=blocks["BD"],
                           num_warps=blocks["num_warps"])
    return dh0


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode, h0, *inputs):
        inputs = _same_strides(list(inputs))
        h0 = None if h0 is None else h0.contiguous()
        h, h_last = _scan_forward(inputs, h0, mode)
        ctx.mode, ctx.has_h0 = mode, h0 is not None
        ctx.save_for_backward(h0, h, *inputs)
        return h, h_last

    @staticmethod
    def backward(ctx, dh, dh_last):
        h0, h, *inputs = ctx.saved_tensors
        grads = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in inputs]
        dh0 = _scan_backward(inputs, grads, h0, h, dh, dh_last, ctx.mode)
        return None, None if dh0 is None else dh0.to(h0.dtype), *grads


class _ProjectedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mode, roles, u, weight, bias, h0):
        u, weight = u.contiguous(), weight.contiguous()
        h0 = None if h0 is None else h0.contiguous()
        (B, T, K), D = u.shape, weight.shape[0] // len(roles)
        h = torch.empty(B, T, D, dtype=u.dtype, device=u.device)
        h_last = torch.empty(B, D, dtype=torch.float32, device=u.device)
        rows = [role * D for role in (list(roles) + [0])[:3]]
        precision = _matmul_precision()
        blocks = PROJ_BLOCKS[precision]
        grid = (triton.cdiv(D, blocks["BD"]), B)
        _proj_scan_fwd_kernel[grid](u, weight, weight if bias is None else bias, h_last if h0 is None else h0, h,
                                    h_last, T, K, D, u.stride(0), u.stride(1), weight.stride(0), T * D, D, *rows,
                                    MODE=mode, HAS_BIAS=bias is not None, HAS_H0=h0 is not None,
                                    PRECISION=precision, BT=blocks["BT"], BD=blocks["BD"],
                                    BK=blocks["BK"], num_warps=blocks["num_warps"])
        ctx.mode, ctx.roles = mode, roles
        ctx.save_for_backward(u, weight, bias, h0, h)
        return h, h_last

    @staticmethod
    def backward(ctx, dh, dh_last):
        u, weight, bias, h0, h = ctx.saved_tensors
        pre = F.linear(u, weight, bias)  # recomputed: (B, T, num_branches * D)
        D = h.shape[-1]
        d_pre = torch.empty_like(pre)
        inputs = [pre[..., role * D:(role + 1) * D] for role in ctx.roles]
        grads = [d_pre[..., role * D:(role + 1) * D] for role in ctx.roles]
        dh0 = _scan_backward(inputs, grads, h0, h, dh, dh_last, ctx.mode)
        du = d_pre @ weight if ctx.needs_input_grad[2] else None
        d_weight = d_pre.flatten(0, 1).t() @ u.flatten(0, 1) if ctx.needs_input_grad[3] else None
        d_bias = d_pre.sum((0, 1)) if bias is not None and ctx.needs_input_grad[4] else None
        return None, None, du, d_weight, d_bias, None if dh0 is None else dh0.to(h0.dtype)


# ----------------------------------------------------------------------------------------------- entry points
def _check(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], h0: torch.Tensor | None) -> None:
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


def linear_recurrence_triton(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None):
    """h_t = a_t h_{t-1} + b_t. a, b: (B, T, D); h0: (B, D) or None. -> (h (B, T, D), h_last (B, D) float32)."""
    _check(("a", "b"), (a, b), h0)
    return _Scan.apply(LINEAR, h0, a, b)


def mingru_scan_triton(gate: torch.Tensor, hidden: torch.Tensor, h0: torch.Tensor | None = None):
    """minGRU from pre-activations gate, hidden (B, T, D); h0 (B, D) or None. -> (h, h_last float32)."""
    _check(("gate", "hidden"), (gate, hidden), h0)
    return _Scan.apply(MINGRU, h0, gate, hidden)


def minlstm_scan_triton(forget: torch.Tensor, input: torch.Tensor, hidden: torch.Tensor,
                        h0: torch.Tensor | None = None):
    """minLSTM from pre-activations forget, input, hidden (B, T, D); h0 (B, D) or None. -> (h, h_last float32)."""
    _check(("forget", "input", "hidden"), (forget, input, hidden), h0)
    return _Scan.apply(MINLSTM, h0, forget, input, hidden)


def projected_scan_triton(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          h0: torch.Tensor | None, mode: int, roles: tuple[int, ...]):
    """minGRU/minLSTM with the in-projection fused: pre = u @ weight^T + bias, split in len(roles) branches of D.

    u: (B, T, K); weight: (len(roles) * D, K), same dtype as u; bias: (len(roles) * D,) or None; h0: (B, D) or None.
    mode MINGRU: roles = (gate branch, hidden branch); MINLSTM: (forget, input, hidden) branch indices.
    Returns (h (B, T, D) in u's dtype, h_last (B, D) float32).
    """
    if mode not in (MINGRU, MINLSTM) or len(roles) != NUM_INPUTS[mode] or sorted(roles) != list(range(len(roles))):
        raise ValueError(f"mode/roles: expected MINGRU with 2 or MINLSTM with 3 distinct branch indices, "
                         f"got mode={mode}, roles={roles}")
    if weight.ndim != 2 or weight.shape[0] % len(roles) or weight.shape[1] != u.shape[-1] or weight.dtype != u.dtype:
        raise ValueError(f"weight: expected ({len(roles)} * D, {u.shape[-1]}) of dtype {u.dtype}, "
                         f"got {tuple(weight.shape)} {weight.dtype}")
    D = weight.shape[0] // len(roles)
    _check(("u",), (u,), None)
    if h0 is not None and tuple(h0.shape) != (u.shape[0], D):
        raise ValueError(f"h0: expected shape {(u.shape[0], D)}, got {tuple(h0.shape)}")
    return _ProjectedScan.apply(mode, tuple(roles), u, weight, bias, h0)
