"""Head-wise L2 normalization: each head's D features divided by their Euclidean norm (Gated DeltaNet's q and k).

`l2_normalize_heads(x, eps)` takes x (..., H, D) with any strides but the last (the split views of a packed conv
output) and returns a contiguous (..., H, D) in x's dtype: x / max(||x||, eps), eps as `F.normalize`'s.
`l2_normalize_heads_reference` is `F.normalize` in float32 (float64 for float64 inputs), returned in x's dtype. On
CUDA one Triton pass each way (`_L2NormalizeHeadsFunction`) replaces F.normalize's float32 norm, clamp, divide and
the copy to contiguous, computing in float32 and rounding once; under bf16 autocast its output stays 16-bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype, use_fused_kernel
from .._triton import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["l2_normalize_heads", "l2_normalize_heads_reference"]


def l2_normalize_heads_reference(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """F.normalize over the last dim in float32 (float64 for float64 inputs), returned contiguous in x's dtype."""
    return F.normalize(x.to(compute_dtype(x)), dim=-1, eps=eps).to(x.dtype).contiguous()


def l2_normalize_heads(x: torch.Tensor, eps: float = 1e-12, *, impl: str = "auto") -> torch.Tensor:
    """`l2_normalize_heads_reference` for x (..., H, D); impl "auto" runs it by the Triton kernels on CUDA
    (float32/bfloat16/float16), "triton" forces them (on the CPU under TRITON_INTERPRET=1), "reference" the PyTorch
    form. Differentiable; the gradient is F.normalize's, clamp included."""
    if x.dim() < 2:
        raise ValueError(f"x: expected shape (..., H, D), got {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"eps: expected > 0, got {eps}")
    supported = HAVE_TRITON and (x.is_cuda or INTERPRET) and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if not use_fused_kernel(impl, supported, x.is_cuda, f"x: {x.dtype} on {x.device.type}"):
        return l2_normalize_heads_reference(x, eps)
    *lead, H, D = x.shape
    return _L2NormalizeHeadsFunction.apply(x.reshape(-1, H, D), eps).view(*lead, H, D)


def _rows_per_program(D: int) -> int:
    return max(1, 8192 // triton.next_power_of_2(D))


if HAVE_TRITON:

    @triton.jit
    def _tile(x_ptr, N, D, row_stride, head_stride, eps, BN: tl.constexpr, BD: tl.constexpr):
        """This program's (block of BN rows, head) tile: rows, feature offsets, mask, x in float32, the norms
        ||x|| per row and their clamped reciprocals 1 / max(||x||, eps)."""
        rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        cols = tl.arange(0, BD)
        mask = (rows < N)[:, None] & (cols < D)[None, :]
        head = tl.program_id(1)
        x = tl.load(x_ptr + rows[:, None] * row_stride + head * head_stride + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, 1))
        rnorm = 1.0 / tl.maximum(norm, eps)
        return rows, cols, mask, x, norm, rnorm

    @triton.jit
    def _l2_normalize_kernel(x_ptr, y_ptr, N, H, D, row_stride, head_stride, eps, BN: tl.constexpr,
                             BD: tl.constexpr):
        rows, cols, mask, x, _, rnorm = _tile(x_ptr, N, D, row_stride, head_stride, eps, BN, BD)
        offsets = (rows[:, None] * H + tl.program_id(1)) * D + cols[None, :]
        tl.store(y_ptr + offsets, (x * rnorm[:, None]).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _l2_normalize_backward_kernel(x_ptr, dy_ptr, dx_ptr, N, H, D, row_stride, head_stride, eps,
                                      BN: tl.constexpr, BD: tl.constexpr):
        """dx = (dy - y (y . dy)) / max(||x||, eps) with y = x / max(||x||, eps); where ||x|| < eps the clamped
        norm is a constant (clamp's subgradient, as F.normalize's), so dx = dy / eps there."""
        rows, cols, mask, x, norm, rnorm = _tile(x_ptr, N, D, row_stride, head_stride, eps, BN, BD)
        offsets = (rows[:, None] * H + tl.program_id(1)) * D + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        y = x * rnorm[:, None]
        y_dy = tl.where(norm >= eps, tl.sum(y * dy, 1), 0.0)
        tl.store(dx_ptr + offsets, ((dy - y * y_dy[:, None]) * rnorm[:, None]).to(dx_ptr.dtype.element_ty),
                 mask=mask)


class _L2NormalizeHeadsFunction(torch.autograd.Function):
    """x3: (N, H, D) with feature stride 1 (any row and head strides); y (N, H, D) contiguous in x's dtype."""

    @staticmethod
    def forward(ctx, x3, eps):
        if x3.stride(-1) != 1:
            x3 = x3.contiguous()
        N, H, D = x3.shape
        y = torch.empty(N, H, D, device=x3.device, dtype=x3.dtype)
        BN = _rows_per_program(D)
        _l2_normalize_kernel[(triton.cdiv(N, BN), H)](x3, y, N, H, D, x3.stride(0), x3.stride(1), eps, BN=BN,
                                                      BD=triton.next_power_of_2(D), num_warps=4)
        ctx.save_for_backward(x3)  # x, not y: the backward recomputes the norms in float32 from the inputs
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        (x3,) = ctx.saved_tensors
        dy = dy.contiguous()
        N, H, D = x3.shape
        dx = torch.empty(N, H, D, device=x3.device, dtype=x3.dtype)
        BN = _rows_per_program(D)
        _l2_normalize_backward_kernel[(triton.cdiv(N, BN), H)](x3, dy, dx, N, H, D, x3.stride(0), x3.stride(1),
                                                               ctx.eps, BN=BN, BD=triton.next_power_of_2(D),
                                                               num_warps=4)
        return dx, None
