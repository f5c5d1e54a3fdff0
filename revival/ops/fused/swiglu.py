"""SwiGLU's gating: silu(gate) * up, on the packed output of the two up-projections.

`swiglu(gate_up)` takes gate_up = cat(gate, up) along the last dim, shape (..., 2F), and returns (..., F). The packed
form is what one product of the concatenated weights produces, and it lets the backward write one (..., 2F) gradient
instead of two that autograd would then concatenate. `swiglu_reference` is the PyTorch formula. For large CUDA
tensors (or any under TRITON_INTERPRET=1 at KERNEL_MIN_ELEMENTS) one Triton pass each way replaces PyTorch's two
forward (silu, multiply) and four backward passes, computing in float32 and rounding once.
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

__all__ = ["swiglu", "swiglu_reference"]

# Outputs with at least this many elements take the Triton kernels (smaller ones: launch cost dominates either way)
KERNEL_MIN_ELEMENTS = 1 << 16
_BLOCK_ROWS, _BLOCK_COLS = 8, 512


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up = the two halves of gate_up's last dim."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = cat(gate, up) on the last dim: (..., 2F) -> (..., F); differentiable."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up: expected an even last dim (gate and up side by side), got shape "
                         f"{tuple(gate_up.shape)}")
    if not _use_kernel(gate_up):
        return swiglu_reference(gate_up)
    if gate_up.dim() == 2:
        return _SwiGLUFunction.apply(gate_up)
    *lead, two_f = gate_up.shape
    return _SwiGLUFunction.apply(gate_up.reshape(-1, two_f)).view(*lead, two_f // 2)


def _use_kernel(gate_up: torch.Tensor) -> bool:
    if not _HAVE_TRITON or gate_up.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if gate_up.numel() < 2 * KERNEL_MIN_ELEMENTS:
        return False
    return gate_up.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if _HAVE_TRITON:

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
