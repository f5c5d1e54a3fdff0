"""One mLSTM step (decode) in Triton, state in float32.

Reads C (Dk x Dv), n, m once and writes the new ones: the step is bound by those bytes (2 * 4 * Dk * Dv per head).
Two ways to tile C, chosen by `StepLaunch.variant` (both give the same result up to float32 summation order):
- "tile": one program per (batch*head, Dv tile) holds the whole Dk x BV tile of C in registers;
- "stream": the same grid, each program walks Dk in BK-row blocks (fewer registers, a pipelined loop).
A third, "split" (a grid dim over Dk blocks plus a summing kernel), never won on the H200 and was deleted
(benchmarks/results/gpu_mlstm_step_variants.json).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton  # noqa: F401
import triton.language as tl

from ..._triton import CompiledLaunch
from .forward import _kv_tile, _log_sigmoid, _pow2

STEP_VARIANTS = ("tile", "stream")


@dataclass(frozen=True)
class StepLaunch:
    """How the step kernel tiles the state (C is Dk x Dv per batch*head row).

    variant: one of STEP_VARIANTS; block_k: rows of C per loop iteration of "stream", unused by "tile" (whole Dk);
    block_v: Dv columns per program; num_warps; num_stages: software pipelining depth of the "stream" loop.
    """

    variant: str = "tile"
    block_k: int = 32
    block_v: int = 32
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.variant not in STEP_VARIANTS:
            raise ValueError(f"variant: expected one of {STEP_VARIANTS}, got {self.variant!r}")
        for name in ("block_k", "block_v", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 1, got {value!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages: expected an int >= 1, got {self.num_stages!r}")


_STREAM_MIN_STATE = 1 << 22  # elements of C (16 MiB float32); between the measured 1.2M and 16.8M, not itself measured


@functools.lru_cache(maxsize=64)  # a pure function of its ints; building the dataclass costs ~5 us per step
def step_launch(rows: int, Dk: int, Dv: int) -> StepLaunch:
    """The default launch of the step for `rows` = batch*head and head dims Dk, Dv (change the default here)."""
    # H200 probe (benchmarks/results/gpu_mlstm_step_variants.json): stream wins at 16.8M state elements, tile at ~1.2M
    if rows * Dk * Dv >= _STREAM_MIN_STATE:
        return StepLaunch(variant="stream", block_k=32, block_v=64, num_warps=4, num_stages=2)
    return StepLaunch(variant="tile", block_v=max(16, min(_pow2(Dv), 8192 // _pow2(Dk))), num_warps=4)


@triton.jit
def _gates(i_ptr, f_ptr, m_ptr, row):
    """The stabilizer m_new and the stabilized gates of one row."""
    m = tl.load(m_ptr + row)
    ig = tl.load(i_ptr + row).to(tl.float32)
    log_f = _log_sigmoid(tl.load(f_ptr + row).to(tl.float32))
    m_new = tl.maximum(log_f + m, ig)
    return m_new, tl.exp(log_f + m - m_new), tl.exp(ig - m_new)


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, c_ptr, n_ptr, m_ptr,
    h_ptr, c_out_ptr, n_out_ptr, m_out_ptr,
    DK, DV, scale, eps,
    BKF: tl.constexpr, BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    offs_k, offs_v, mask_k, mask_v, mask_kv, state_off = _kv_tile(row, 0, iv * BV, DK, DV, BKF, BV)
    C = tl.load(c_ptr + state_off, mask=mask_kv, other=0.0)
    n = tl.load(n_ptr + row * DK + offs_k, mask=mask_k, other=0.0)
    q = tl.load(q_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    m_new, f_bar, i_bar = _gates(i_ptr, f_ptr, m_ptr, row)
    C = f_bar * C + (i_bar * k)[:, None] * v[None, :]
    n = f_bar * n + i_bar * k
    num = tl.sum(q[:, None] * C, 0)
    den = tl.maximum(tl.abs(tl.sum(q * n, 0)), tl.exp(-m_new)) + eps
    tl.store(h_ptr + row * DV + offs_v, (num / den).to(h_ptr.dtype.element_ty), mask=mask_v)
    tl.store(c_out_ptr + state_off, C, mask=mask_kv)
    if iv == 0:
        tl.store(n_out_ptr + row * DK + offs_k, n, mask=mask_k)
        tl.store(m_out_ptr + row, m_new)


@triton.jit
def _step_stream_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, c_ptr, n_ptr, m_ptr,
    h_ptr, c_out_ptr, n_out_ptr, m_out_ptr,
    DK, DV, scale, eps,
    BKF: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    m_new, f_bar, i_bar = _gates(i_ptr, f_ptr, m_ptr, row)
    # n and the normalizer once, over the whole Dk
    offs_kf = tl.arange(0, BKF)
    mask_kf = offs_kf < DK
    n = tl.load(n_ptr + row * DK + offs_kf, mask=mask_kf, other=0.0)
    k = tl.load(k_ptr + row * DK + offs_kf, mask=mask_kf, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + row * DK + offs_kf, mask=mask_kf, other=0.0).to(tl.float32) * scale
    n = f_bar * n + i_bar * k
    den = tl.maximum(tl.abs(tl.sum(q * n, 0)), tl.exp(-m_new)) + eps
    if iv == 0:
        tl.store(n_out_ptr + row * DK + offs_kf, n, mask=mask_kf)
        tl.store(m_out_ptr + row, m_new)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_v = offs_v < DV
    v = tl.load(v_ptr + row * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    num = tl.zeros((BV,), dtype=tl.float32)
    for k0 in tl.range(0, DK, BK, num_stages=STAGES):
        offs_k, _, mask_k, _, mask_kv, state_off = _kv_tile(row, k0, iv * BV, DK, DV, BK, BV)
        C = tl.load(c_ptr + state_off, mask=mask_kv, other=0.0)
        kb = tl.load(k_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        qb = tl.load(q_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
        C = f_bar * C + (i_bar * kb)[:, None] * v[None, :]
        tl.store(c_out_ptr + state_off, C, mask=mask_kv)
        num += tl.sum(qb[:, None] * C, 0)
    tl.store(h_ptr + row * DV + offs_v, (num / den).to(h_ptr.dtype.element_ty), mask=mask_v)


_STEP = CompiledLaunch(_step_kernel)
_STEP_STREAM = CompiledLaunch(_step_stream_kernel)


def _check_out(out, shapes, state) -> None:
    """`out` = (h, C, n, m) buffers: right shapes and dtypes, contiguous; C may be the input C, n and m not the
    input n, m (every Dv tile reads those while one of them writes the new values)."""
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise ValueError(f"out: expected a tuple (h, C, n, m) of tensors or None, got {type(out).__name__}")
    for name, x, (shape, dtype) in zip(("h", "C", "n", "m"), out, shapes):
        if not (isinstance(x, torch.Tensor) and x.shape == shape and x.dtype == dtype and x.is_contiguous()):
            got = (tuple(x.shape), x.dtype, x.is_contiguous()) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"out ({name}): expected a contiguous {dtype} tensor of shape {shape}, got {got}")
    for name, x, s in zip(("n", "m"), out[2:], state[1:]):
        if x.data_ptr() == s.data_ptr():
            raise ValueError(f"out ({name}): must not be the input state's {name} (only C can be updated in place)")


@functools.lru_cache(maxsize=256)
def _geometry(rows: int, Dk: int, Dv: int, cfg: StepLaunch):
    """(grid, constexprs) of one launch; cached: a pure function of its arguments whose Python costs more host time
    than the decode kernel's GPU time at small shapes."""
    BKF = _pow2(Dk)
    BV = min(cfg.block_v, _pow2(Dv))
    grid = (rows, -(-Dv // BV))
    if cfg.variant == "tile":
        return grid, {"BKF": BKF, "BV": BV}
    return grid, {"BKF": BKF, "BK": min(cfg.block_k, BKF), "BV": BV, "STAGES": cfg.num_stages}


def mlstm_step_triton(q, k, v, i, f, state, eps: float = 1e-6, launch: StepLaunch | None = None, out=None):
    """One token. q, k: (B, H, Dk); v: (B, H, Dv); i, f: (B, H); state (C (B, H, Dk, Dv), n (B, H, Dk), m (B, H))
    in float32. Returns h (B, H, Dv) in q's dtype and the new state: new tensors, or the buffers of `out` = (h, C,
    n, m) when given (C may be the input C: updated in place). `launch`: a StepLaunch, None for `step_launch`'s
    default of the shape."""
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    C, n, m = (s if s.dtype == torch.float32 and s.is_contiguous() else s.float().contiguous() for s in state)
    q, k, v, i, f = (x if x.is_contiguous() else x.contiguous() for x in (q, k, v, i, f))
    rows = B * H
    cfg = step_launch(rows, Dk, Dv) if launch is None else launch
    if out is None:
        h = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
        C_new, n_new, m_new = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    else:
        _check_out(out, ((v.shape, q.dtype), (C.shape, torch.float32), (n.shape, torch.float32),
                         (m.shape, torch.float32)), (C, n, m))
        h, C_new, n_new, m_new = out
    grid, constexprs = _geometry(rows, Dk, Dv, cfg)
    kernel = _STEP if cfg.variant == "tile" else _STEP_STREAM
    kernel(grid, q, k, v, i, f, C, n, m, h, C_new, n_new, m_new, Dk, Dv, Dk**-0.5, eps, constexprs=constexprs,
           num_warps=cfg.num_warps)
    return h, (C_new, n_new, m_new)
