"""One mLSTM step (decode) in Triton: one program per (batch*head, Dv-tile), state in float32.

Reads C (Dk x Dv), n, m once and writes the new ones: the step is bound by those bytes (2 * 4 * Dk * Dv per head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import CompiledLaunch
from .forward import _log_sigmoid, _pow2


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, i_ptr, f_ptr, c_ptr, n_ptr, m_ptr,
    h_ptr, c_out_ptr, n_out_ptr, m_out_ptr,
    DK, DV, scale, eps,
    BKF: tl.constexpr, BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    offs_k = tl.arange(0, BKF)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    state_off = row * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    C = tl.load(c_ptr + state_off, mask=mask_kv, other=0.0)
    n = tl.load(n_ptr + row * DK + offs_k, mask=mask_k, other=0.0)
    m = tl.load(m_ptr + row)
    q = tl.load(q_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + row * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    ig = tl.load(i_ptr + row).to(tl.float32)
    log_f = _log_sigmoid(tl.load(f_ptr + row).to(tl.float32))
    m_new = tl.maximum(log_f + m, ig)
    f_bar = tl.exp(log_f + m - m_new)
    i_bar = tl.exp(ig - m_new)
    C = f_bar * C + (i_bar * k)[:, None] * v[None, :]
    n = f_bar * n + i_bar * k
    num = tl.sum(q[:, None] * C, 0)
    den = tl.maximum(tl.abs(tl.sum(q * n, 0)), tl.exp(-m_new)) + eps
    tl.store(h_ptr + row * DV + offs_v, (num / den).to(h_ptr.dtype.element_ty), mask=mask_v)
    tl.store(c_out_ptr + state_off, C, mask=mask_kv)
    if iv == 0:
        tl.store(n_out_ptr + row * DK + offs_k, n, mask=mask_k)
        tl.store(m_out_ptr + row, m_new)


_STEP = CompiledLaunch(_step_kernel)


def mlstm_step_triton(q, k, v, i, f, state, eps: float = 1e-6):
    """One token. q, k: (B, H, Dk); v: (B, H, Dv); i, f: (B, H); state (C (B, H, Dk, Dv), n (B, H, Dk), m (B, H))
    in float32. Returns h (B, H, Dv) in q's dtype and the new state (new tensors; the old state is not modified)."""
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    C, n, m = (s.float().contiguous() for s in state)
    q, k, v, i, f = (x.contiguous() for x in (q, k, v, i, f))
    h = torch.empty(B, H, Dv, device=q.device, dtype=q.dtype)
    C_new, n_new, m_new = torch.empty_like(C), torch.empty_like(n), torch.empty_like(m)
    BKF = _pow2(Dk)
    BV = max(16, min(_pow2(Dv), 8192 // BKF))
    _STEP((B * H, triton.cdiv(Dv, BV)), q, k, v, i, f, C, n, m, h, C_new, n_new, m_new, Dk, Dv, Dk**-0.5, eps,
          constexprs={"BKF": BKF, "BV": BV}, num_warps=4)
    return h, (C_new, n_new, m_new)
