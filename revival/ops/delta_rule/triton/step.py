"""One gated delta rule step (decode) in Triton: one program per (batch*head, Dv-tile), state in float32.

S <- exp(g) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T (scale q). Bound by reading and writing S
(2 * 4 * Dk * Dv bytes per head); each Dv-tile holds all of Dk, so the tiles are independent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import CompiledLaunch
from .forward import load_state, pow2, store_state


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, o_ptr, s_out_ptr,
    DK, DV, scale,
    BK: tl.constexpr, BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    iv = tl.program_id(1)
    S = load_state(s_ptr, row, 0, 1, DK, DV, BK, BV, iv) * tl.exp(tl.load(g_ptr + row).to(tl.float32))
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    mask_k = offs_k < DK
    mask_v = offs_v < DV
    k = tl.load(k_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + row * DK + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
    v = tl.load(v_ptr + row * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    u = tl.load(beta_ptr + row).to(tl.float32) * (v - tl.sum(S * k[:, None], 0))
    S += k[:, None] * u[None, :]
    tl.store(o_ptr + row * DV + offs_v, tl.sum(S * q[:, None], 0).to(o_ptr.dtype.element_ty), mask=mask_v)
    store_state(s_out_ptr, S, row, 0, 1, DK, DV, BK, BV, iv)


_STEP = CompiledLaunch(_step_kernel)


def delta_rule_step(q, k, v, g, beta, state, scale: float):
    """q, k (n, H, Dk); v (n, H, Dv); g, beta (n, H); state (n, H, Dk, Dv) or None. Returns o (n, H, Dv) in q's
    dtype and the new state float32 (a new tensor; the old one is not modified)."""
    n, H, Dk = q.shape
    Dv = v.shape[-1]
    S = torch.zeros(n, H, Dk, Dv, device=q.device) if state is None else state.float().contiguous()
    q, k, v = (x.to(q.dtype).contiguous() for x in (q, k, v))
    g, beta = g.float().contiguous(), beta.float().contiguous()
    o = torch.empty(n, H, Dv, device=q.device, dtype=q.dtype)
    S_new = torch.empty_like(S)
    BK = pow2(Dk)
    BV = max(16, min(pow2(Dv), 8192 // BK))
    _STEP((n * H, triton.cdiv(Dv, BV)), q, k, v, g, beta, S, o, S_new, Dk, Dv, float(scale),
          constexprs={"BK": BK, "BV": BV}, num_warps=4)
    return o, S_new
