"""SwiGLU's gating: silu(gate) * up, on the packed output of the two up-projections.

`swiglu(gate_up)` takes gate_up = cat(gate, up) along the last dim, shape (..., 2F), and returns (..., F). The packed
form is what one product of the concatenated weights produces, and it lets the backward write one (..., 2F) gradient
instead of two that autograd would then concatenate. `swiglu_reference` is the PyTorch formula. For large CUDA
tensors (`impl`: "auto") one Triton pass each way replaces PyTorch's two
forward (silu, multiply) and four backward passes, computing in float32 and rounding once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import use_fused_kernel
from .._triton import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["swiglu", "swiglu_reference"]

# Outputs with at least this many elements take the Triton kernels (smaller ones: launch cost dominates either way)
KERNEL_MIN_ELEMENTS = 1 << 16
_BLOCK_ROWS, _BLOCK_COLS = 8, 512


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up = the two halves of gate_up's last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for gate_up = cat(gate, up) on the last dim: (..., 2F) -> (..., F); differentiable. impl
    "auto": the Triton kernels for CUDA tensors with at least KERNEL_MIN_ELEMENTS outputs, else `swiglu_reference`;
    "triton" or "reference" force one (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up: expected an even last dim (gate and up side by side), got shape "
                         f"{tuple(gate_up.shape)}")
    supported = (HAVE_TRITON and (gate_up.is_cuda or INTERPRET)
                 and gate_up.dtype in (torch.float32, torch.bfloat16, torch.float16))
    if not use_fused_kernel(impl, supported, gate_up.numel() >= 2 * KERNEL_MIN_ELEMENTS,
                            f"gate_up: {gate_up.dtype} on {gate_up.device.type}"):
        return swiglu_reference(gate_up)
    if gate_up.dim() == 2:
        return _SwiGLUFunction.apply(gate_up)
    *lead, two_f = gate_up.shape
    return _SwiGLUFunction.apply(gate_up.reshape(-1, two_f)).view(*lead, two_f // 2)


if HAVE_TRITON:

    @triton.jit
    def _tile(gate_up_ptr, N, F_half, row_stride, BR: tl.constexpr, BC: tl.constexpr):
        """This program's (BR rows, BC features) tile: row and feature offsets, mask, gate and up in float32."""
        rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        mask = (rows < N)[:, None] & (cols < F_half)[None, :]
        gate_offsets = rows[:, None] * row_stride + cols[None, :]
        gate = tl.load(gate_up_ptr + gate_offsets, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + gate_offsets + F_half, mask=mask, other=0.0).to(tl.float32)
        return rows, cols, mask, gate, up

    @triton.jit
    def _swiglu_kernel(gate_up_ptr, out_ptr, N, F_half, row_stride, BR: tl.constexpr, BC: tl.constexpr):
        rows, cols, mask, gate, up = _tile(gate_up_ptr, N, F_half, row_stride, BR, BC)
        silu = gate / (1.0 + tl.exp(-gate))
        tl.store(out_ptr + rows[:, None] * F_half + cols[None, :], (silu * up).to(out_ptr.dtype.element_ty),
                 mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(gate_up_ptr, dout_ptr, dgate_up_ptr, N, F_half, row_stride,
                                BR: tl.constexpr, BC: tl.constexpr):
        """d gate = dout * up * sigmoid(gate) (1 + gate (1 - sigmoid(gate))), d up = dout * silu(gate), written side
        by side into the (N, 2F) gradient."""
        rows, cols, mask, gate, up = _tile(gate_up_ptr, N, F_half, row_stride, BR, BC)
        dout = tl.load(dout_ptr + rows[:, None] * F_half + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-gate))
        dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
        dup = dout * gate * sig
        offsets = rows[:, None] * (2 * F_half) + cols[None, :]
        tl.store(dgate_up_ptr + offsets, dgate.to(dgate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(dgate_up_ptr + offsets + F_half, dup.to(dgate_up_ptr.dtype.element_ty), mask=mask)


class _SwiGLUFunction(torch.autograd.Function):
    """gate_up: (N, 2F) with a contiguous last dim (any row stride) -> (N, F) contiguous."""

    @staticmethod
    def forward(ctx, gate_up):
        if gate_up.stride(-1) != 1:
            gate_up = gate_up.contiguous()
        N, two_f = gate_up.shape
        F_half = two_f // 2
        out = torch.empty(N, F_half, device=gate_up.device, dtype=gate_up.dtype)
        grid = (triton.cdiv(N, _BLOCK_ROWS), triton.cdiv(F_half, _BLOCK_COLS))
        _swiglu_kernel[grid](gate_up, out, N, F_half, gate_up.stride(0), BR=_BLOCK_ROWS, BC=_BLOCK_COLS, num_warps=8)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        dout = dout.contiguous()
        N, two_f = gate_up.shape
        dgate_up = torch.empty(N, two_f, device=gate_up.device, dtype=gate_up.dtype)
        grid = (triton.cdiv(N, _BLOCK_ROWS), triton.cdiv(two_f // 2, _BLOCK_COLS))
        _swiglu_backward_kernel[grid](gate_up, dout, dgate_up, N, two_f // 2, gate_up.stride(0),
                                      BR=_BLOCK_ROWS, BC=_BLOCK_COLS, num_warps=8)
        return dgate_up
