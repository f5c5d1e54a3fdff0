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
    """The kernels plus the skip term D x, which costs one pass each way here (in PyTorch autograd it took float32
    copies of x and y, a product, a sum and a cast forward, six passes backward, and saved x in float32)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, S0, starts, L, cfg):
        from .forward import ssd_forward

        n, T, H, P = x.shape
        N = B.shape[-1]
        y, S_T, states = ssd_forward(x, dt, A, B, C, S0.reshape(n * H, P, N), starts, L, cfg)
        if D is not None:  # y + D x computed in float32 (D's dtype promotes), rounded once into y
            y.addcmul_(x, D.float()[:, None])
        if any(ctx.needs_input_grad[:7]):
            ctx.save_for_backward(x, dt, A, B, C, D, starts, states)
            ctx.L, ctx.cfg = L, cfg
        return y, S_T.reshape(n, H, P, N)

    @staticmethod
    def backward(ctx, dy, dS_T):
        from .backward import ssd_backward

        x, dt, A, B, C, D, starts, states = ctx.saved_tensors
        n, T, H, P = x.shape
        N = B.shape[-1]
        dy = torch.zeros_like(x) if dy is None else dy.to(x.dtype).contiguous()
        dS_T = (torch.zeros(n * H, P, N, device=x.device) if dS_T is None
                else dS_T.reshape(n * H, P, N).float().contiguous())
        dx, ddt, dA, dB, dC, dS0 = ssd_backward(x, dt, A, B, C, starts, states, dy, dS_T, ctx.L, ctx.cfg)
        dD = None
        if D is not None:
            dx.addcmul_(dy, D.float()[:, None])  # + D dy, in float32, rounded once
            if ctx.needs_input_grad[5]:
                dD = float32_product(dy, x).sum((0, 1, 3)).to(D.dtype)
        return dx, ddt, dA, dB, dC, dD, dS0.reshape(n, H, P, N), None, None, None


def float32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a * b in float32 in one pass for 16-bit a, b (exact: a product of two 16-bit floats fits float32): a
    dimensioned float32 zero sets addcmul's compute and output dtype, where a * b would round to 16 bits."""
    return torch.addcmul(torch.zeros(1, device=a.device), a, b)


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
