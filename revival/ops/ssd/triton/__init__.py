"""Triton SSD (Mamba-2) kernels (GPU): chunkwise forward + backward behind a `torch.autograd.Function`, and a decode
step.

`ssd_triton(x, dt, A, B, C, D, state, chunk_size=64, document_starts=None, launch=None)` has the contract of
`revival.ops.ssd.ssd` (inputs validated, B and C per group (n, T, G, N)); `ssd_step_triton` is one token of it.
Computation in float32 (products on tf32 matrix units for 16-bit inputs); y in x's dtype, the state float32.
`available()`: Triton importable and a CUDA device (or `TRITON_INTERPRET=1` for CPU tests).
"""

from __future__ import annotations

import torch

from ..._triton import available, chunkwise_kernel_inputs, kernel_chunk_size, require_triton
from .config import LaunchConfig, launch_config

__all__ = ["LaunchConfig", "available", "kernel_chunk_size", "launch_config", "ssd_step_triton", "ssd_triton"]

class _SSD(torch.autograd.Function):
    """The kernels, the skip term D x included: y + D x and dx + D dy in float32 before their one rounding, D's
    gradient as per-(head, chunk) sums of dy . x in the dC kernel, summed by torch."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, S0, starts, L, cfg):
        from .forward import ssd_forward

        n, T, H, P = x.shape
        N = B.shape[-1]
        D32 = None if D is None else D.float().contiguous()
        y, S_T, states = ssd_forward(x, dt, A, B, C, D32, S0.reshape(n * H, P, N), starts, L, cfg)
        if any(ctx.needs_input_grad[:7]):
            ctx.save_for_backward(x, dt, A, B, C, D32, starts, states)
            ctx.L, ctx.cfg, ctx.D_dtype = L, cfg, None if D is None else D.dtype
        return y, S_T.reshape(n, H, P, N)

    @staticmethod
    def backward(ctx, dy, dS_T):
        from .backward import ssd_backward

        x, dt, A, B, C, D32, starts, states = ctx.saved_tensors
        n, T, H, P = x.shape
        N = B.shape[-1]
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
        dS_T = (torch.zeros(n * H, P, N, device=x.device) if dS_T is None
                else dS_T.reshape(n * H, P, N).float().contiguous())
        wants_dD = D32 is not None and ctx.needs_input_grad[5]
        dx, ddt, dA, dB, dC, dS0, dD = ssd_backward(x, dt, A, B, C, D32, starts, states, dy, dS_T, ctx.L, ctx.cfg,
                                                    wants_dD)
        dD = None if dD is None else dD.to(ctx.D_dtype)
        return dx, ddt, dA, dB, dC, dD, dS0.reshape(n, H, P, N), None, None, None


def ssd_triton(x, dt, A, B, C, D=None, state=None, *, chunk_size: int = 64,
               document_starts: torch.Tensor | None = None, launch: LaunchConfig | None = None):
    """Chunkwise SSD. x (n, T, H, P); dt (n, T, H); A (H,); B, C (n, T, G, N); D (H,) or None; state (n, H, P, N)
    or None; document_starts (n, T) bool or None (validated). Returns y (n, T, H, P) in x's dtype and the final
    state (n, H, P, N) float32; differentiable in every input and the initial state. `launch` overrides launch
    settings (`LaunchConfig`)."""
    n, T, H, P = x.shape
    N = B.shape[-1]
    (xs, B, C), (dt, A), S0, starts = chunkwise_kernel_inputs(
        {"x": x, "B": B, "C": C}, (dt, A), state, (n, H, P, N), document_starts, sizes_of="x, B",
        what="head dims and state sizes", P=P, N=N)
    cfg = launch_config(P, N, n * H, launch)
    # the (L, L) score tiles and the (L, P), (L, N) tiles of the gradient kernel stay on chip up to L = 64
    return _SSD.apply(xs, dt, A, B, C, D, S0, starts, kernel_chunk_size(chunk_size), cfg)


def ssd_step_triton(x, dt, A, B, C, D=None, state=None):
    """One token: x (n, H, P); dt (n, H); A (H,); B, C (n, G, N); D (H,) or None; state (n, H, P, N) float32 or
    None. Returns y (n, H, P) in x's dtype and the new state (a new tensor). Forward only (decode)."""
    from .step import ssd_step

    require_triton()
    return ssd_step(x, dt, A, B, C, D, state)
