"""One SSD step (decode) in Triton: one program per (batch*head, P-tile), state in float32.

S <- exp(dt A) S + dt x B^T; y = S C + D x. Bound by reading and writing S (2 * 4 * P * N bytes per head).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import CompiledLaunch
from .forward import pow2


@triton.jit
def _step_kernel(
    x_ptr, dt_ptr, A_ptr, b_ptr, c_ptr, d_ptr, s_ptr, y_ptr, s_out_ptr,
    H, G, P, N,
    BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ip = tl.program_id(1)
    h = row % H
    group = (row // H) * G + h // (H // G)
    offs_p = ip * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mask_p = offs_p < P
    mask_n = offs_n < N
    mask = mask_p[:, None] & mask_n[None, :]
    offs = row * P * N + offs_p[:, None] * N + offs_n[None, :]
    dt = tl.load(dt_ptr + row).to(tl.float32)
    x = tl.load(x_ptr + row * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    B = tl.load(b_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(c_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    S = tl.load(s_ptr + offs, mask=mask, other=0.0) * tl.exp(dt * tl.load(A_ptr + h).to(tl.float32))
    S += (dt * x)[:, None] * B[None, :]
    y = tl.sum(S * C[None, :], 1)
    if HAS_D:
        y += tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + row * P + offs_p, y.to(y_ptr.dtype.element_ty), mask=mask_p)
    tl.store(s_out_ptr + offs, S, mask=mask)


_STEP = CompiledLaunch(_step_kernel)


def ssd_step(x, dt, A, B, C, D, state):
    """x (n, H, P); dt (n, H); A (H,); B, C (n, G, N); D (H,) or None; state (n, H, P, N) or None. Returns
    y (n, H, P) in x's dtype and the new state float32 (a new tensor; the old one is not modified)."""
    n, H, P = x.shape
    G, N = B.shape[1], B.shape[2]
    S = torch.zeros(n, H, P, N, device=x.device) if state is None else state.float().contiguous()
    x, B, C = (t.to(x.dtype).contiguous() for t in (x, B, C))
    dt, A = dt.float().contiguous(), A.float().contiguous()
    D_arg = A if D is None else D.float().contiguous()  # any tensor when HAS_D is off: never read
    y = torch.empty_like(x)
    S_new = torch.empty_like(S)
    BN = pow2(N)
    BP = max(16, min(pow2(P), 8192 // BN))
    _STEP((n * H, triton.cdiv(P, BP)), x, dt, A, B, C, D_arg, S, y, S_new, H, G, P, N,
          constexprs={"BP": BP, "BN": BN, "HAS_D": D is not None}, num_warps=4)
    return y, S_new
