"""Triton gated delta rule kernels (GPU): chunkwise WY forward + backward behind a `torch.autograd.Function`, and a
decode step.

`gated_delta_rule_triton(q, k, v, g, beta, state, scale, chunk_size=64, document_starts=None, launch=None)` has the
contract of `revival.ops.delta_rule.gated_delta_rule` (inputs validated, `scale` resolved);
`gated_delta_rule_step_triton` is one token of it. Computation in float32 (products on tf32 matrix units: one pass
for 16-bit inputs, three for float32, `forward.precisions`); q, k, v read in the narrowest of their dtypes
(`kernel_dtype`), o in q's dtype, the state float32. `available()`: Triton importable and a CUDA device (or
`TRITON_INTERPRET=1` for CPU tests).
"""

from __future__ import annotations

import torch

from ..._triton import available, chunkwise_kernel_inputs, kernel_chunk_size, require_triton
from .config import LaunchConfig, launch_config

__all__ = ["LaunchConfig", "available", "gated_delta_rule_step_triton", "gated_delta_rule_triton",
           "kernel_chunk_size", "launch_config"]

class _GatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, S0, starts, scale, L, cfg):
        from .forward import delta_rule_forward

        n, T, H, Dk = q.shape
        Dv = v.shape[-1]
        needs_backward = any(ctx.needs_input_grad[:6])
        o, S_T, saved = delta_rule_forward(q, k, v, g, beta, S0.reshape(n * H, Dk, Dv), starts, scale, L, cfg,
                                           for_backward=needs_backward)
        if needs_backward:
            ctx.save_for_backward(q, k, v, g, beta, starts, *saved)
            ctx.scale, ctx.L, ctx.cfg = scale, L, cfg
        return o, S_T.reshape(n, H, Dk, Dv)

    @staticmethod
    def backward(ctx, do, dS_T):
        from .backward import delta_rule_backward

        q, k, v, g, beta, starts, *saved = ctx.saved_tensors
        n, T, H, Dk = q.shape
        Dv = v.shape[-1]
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dS_T = (torch.zeros(n * H, Dk, Dv, device=q.device) if dS_T is None
                else dS_T.reshape(n * H, Dk, Dv).float().contiguous())
        dq, dk, dv, dg, dbeta, dS0 = delta_rule_backward(q, k, v, g, beta, starts, *saved, do, dS_T, ctx.scale,
                                                         ctx.L, ctx.cfg)
        return dq, dk, dv, dg, dbeta, dS0.reshape(n, H, Dk, Dv), None, None, None, None


def gated_delta_rule_triton(q, k, v, g, beta, state, scale: float, *, chunk_size: int = 64,
                            document_starts: torch.Tensor | None = None, launch: LaunchConfig | None = None):
    """Chunkwise gated delta rule. q, k (n, T, H, Dk); v (n, T, H, Dv); g, beta (n, T, H); state (n, H, Dk, Dv) or
    None; document_starts (n, T) bool or None (validated). Returns o (n, T, H, Dv) in q's dtype and the final state
    (n, H, Dk, Dv) float32; differentiable in every input and the initial state. `launch` overrides launch settings
    (`LaunchConfig`)."""
    n, T, H, Dk = q.shape
    Dv = v.shape[-1]
    out_dtype, dtype = q.dtype, kernel_dtype(q, k, v)
    (q, k, v), (g, beta), S0, starts = chunkwise_kernel_inputs(
        {"q": q.to(dtype), "k": k, "v": v}, (g, beta), state, (n, H, Dk, Dv), document_starts, sizes_of="q, v",
        what="head dims", Dk=Dk, Dv=Dv)
    # the (L, L) decay and inverse tiles and the (L, D) tiles of the gradient kernels stay on chip up to L = 64
    L = kernel_chunk_size(chunk_size)
    cfg = launch_config(Dk, Dv, n * H, dtype, launch, chunks=-(-T // L))
    o, S_T = _GatedDeltaRule.apply(q, k, v, g, beta, S0, starts, scale, L, cfg)
    return o.to(out_dtype), S_T


def kernel_dtype(q, k, v) -> torch.dtype:
    """The dtype the kernels read q, k, v in: the narrowest of the three (q's when it is float64, refused later).
    Under bf16 autocast F.normalize gives float32 q, k beside a bf16 v: the kernels then take the 16-bit products
    (`forward.precisions`), not float32's, which compile for minutes on sm_90 (docs/kernels.md)."""
    if q.dtype == torch.float64:
        return q.dtype
    return min((q.dtype, k.dtype, v.dtype), key=lambda dtype: dtype.itemsize)


def gated_delta_rule_step_triton(q, k, v, g, beta, state, scale: float):
    """One token: q, k (n, H, Dk); v (n, H, Dv); g, beta (n, H); state (n, H, Dk, Dv) float32 or None. Returns
    o (n, H, Dv) in q's dtype and the new state (a new tensor). Forward only (decode)."""
    from .step import delta_rule_step

    require_triton()
    return delta_rule_step(q, k, v, g, beta, state, scale)
