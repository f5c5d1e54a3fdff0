"""Soft-capping: cap * tanh(x / cap) (xLSTM-7B's gate pre-activations and output logits).

`soft_cap(x, cap)` is the PyTorch formula (`soft_cap_reference`), except for large bfloat16/float16 CUDA tensors
(the logits: B x T x vocab), where three elementwise passes forward and three backward dominate: there one Triton
pass each way (`_SoftCapFunction`), computing in float32. tanh is formed as sign(z) (1 - e) / (1 + e) with
e = exp(-2|z|) (no overflow), and as its series z - z^3/3 + 2 z^5/15 for |z| < 1/8, where 1 - e would cancel.
"""

from __future__ import annotations

import torch

from .._common import use_fused_kernel
from .._triton import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["soft_cap", "soft_cap_reference"]

# Tensors with at least this many elements take the Triton kernels (smaller ones: launch cost dominates either way)
KERNEL_MIN_ELEMENTS = 1 << 20
_BLOCK = 2048


def soft_cap_reference(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap); identity when cap is None."""
    if cap is None:
        return x
    return cap * torch.tanh(x / cap)


def soft_cap(x: torch.Tensor, cap: float | None, *, impl: str = "auto") -> torch.Tensor:
    """cap * tanh(x / cap) (identity when cap is None); differentiable. impl "auto": one Triton pass each way for
    16-bit CUDA tensors of at least KERNEL_MIN_ELEMENTS, else `soft_cap_reference`; "triton" or "reference" force
    one (the kernel takes 16-bit tensors on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    if cap is None:
        return x
    if not cap > 0:
        raise ValueError(f"cap: expected a positive number or None, got {cap!r}")
    supported = HAVE_TRITON and (x.is_cuda or INTERPRET) and x.dtype in (torch.bfloat16, torch.float16)
    if use_fused_kernel(impl, supported, x.numel() >= KERNEL_MIN_ELEMENTS,
                        f"x: {x.dtype} on {x.device.type}; the kernel takes bfloat16/float16 on CUDA"):
        return _SoftCapFunction.apply(x, float(cap))
    return soft_cap_reference(x, cap)


if HAVE_TRITON:

    @triton.jit
    def _tanh(z):
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        zs = tl.minimum(tl.maximum(z, -0.125), 0.125)
        z2 = zs * zs
        series = zs * (1.0 - z2 * (1.0 / 3.0) + z2 * z2 * (2.0 / 15.0))  # |z| < 1/8: the next term is < 3e-8 |z|
        return tl.where(tl.abs(z) < 0.125, series, tl.where(z < 0, -t, t))

    @triton.jit
    def _soft_cap_kernel(x_ptr, y_ptr, N, cap, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (cap * _tanh(x / cap)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _soft_cap_backward_kernel(x_ptr, dy_ptr, dx_ptr, N, cap, BLOCK: tl.constexpr):
        """dx = dy * (1 - tanh(x / cap)^2) = dy * 4 e / (1 + e)^2 with e = exp(-2 |x / cap|) (no cancellation near
        the cap), in float32."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        e = tl.exp(-2.0 * tl.abs(tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) / cap))
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, (dy * (4.0 * e / ((1.0 + e) * (1.0 + e)))).to(dx_ptr.dtype.element_ty), mask=mask)


class _SoftCapFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cap):
        x = x.contiguous()
        y = torch.empty_like(x)
        _soft_cap_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, y, x.numel(), cap, BLOCK=_BLOCK, num_warps=8)
        ctx.save_for_backward(x)
        ctx.cap = cap
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        _soft_cap_backward_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, dy, dx, x.numel(), ctx.cap, BLOCK=_BLOCK,
                                                                      num_warps=8)
        return dx, None
