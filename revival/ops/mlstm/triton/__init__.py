"""Triton mLSTM kernels (GPU): chunkwise forward + backward behind a `torch.autograd.Function`, and a decode step.

`mlstm_triton(q, k, v, i, f, state, chunk_size=64, eps=1e-6, precision="auto", launch=None)` has the contract of
`revival.ops.mlstm` with the state already prepared (float32 `(C, n, m)`); `mlstm_step_triton` that of `mlstm_step`.
`available()` says whether the kernels can run here (Triton importable; a CUDA device, or `TRITON_INTERPRET=1` for CPU
tests). The kernel settings are arguments (`config.py`): `precision` (a preset name or "auto") and `launch` (a
`LaunchConfig`, None for the shape-keyed defaults).
"""

from __future__ import annotations

import torch

from ..._triton import available, require_triton
from .config import PRECISIONS, LaunchConfig, check_settings, launch_config, resolve_precision

__all__ = ["PRECISIONS", "LaunchConfig", "available", "launch_config", "mlstm_triton", "mlstm_step_triton"]

_MAX_CHUNK = 128
# chunk_size x (Dk rounded up to a power of two) bounds the intra-chunk (L, Dk) tiles the kernels hold; above this
# they exceed an H100's 227 KB of shared memory (measured: Dk = 384 failed at L = 64 and 128, ran at L = 32)
_MAX_CHUNK_TIMES_DK = 16384


def keep_chunk_states(Dk: int, Dv: int, chunk_size: int, state_bytes: int, input_bytes: int,
                      max_ratio: float) -> bool:
    """Whether the forward keeps the per-chunk states: while they take at most `max_ratio` times the bytes of the
    token inputs q, k, v (else the backward recomputes them: one more run of the states kernel)."""
    return Dk * Dv * state_bytes / chunk_size <= max_ratio * (2 * Dk + Dv) * input_bytes


def kernel_chunk_size(chunk_size: int, Dk: int) -> int:
    """The chunk the kernels use for a requested `chunk_size` and head dim Dk (results agree to rounding)."""
    dk_padded = 1 << max(Dk - 1, 1).bit_length()
    return max(16, min(chunk_size, _MAX_CHUNK, _MAX_CHUNK_TIMES_DK // dk_padded))


class _MLSTMChunkwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, chunk_size, eps, precision, launch):
        from .forward import mlstm_forward

        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        # q, k, v go to the kernels as they are laid out (e.g. token-major views of a projection's output), only
        # their last dim must be contiguous
        flat = [x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v)]
        gates = [x.reshape(B * H, T).contiguous() for x in (i, f)]
        state0 = (C0.reshape(B * H, Dk, Dv).contiguous(), n0.reshape(B * H, Dk).contiguous(),
                  m0.reshape(B * H).contiguous())
        grad = any(ctx.needs_input_grad[:8])
        from .forward import _state_fp32

        # "auto" splits products only when the initial state needs a gradient
        mode = resolve_precision(precision, any(ctx.needs_input_grad[5:8]))
        state_bytes = 4 if _state_fp32(q.dtype, mode) else q.element_size()
        keep = grad and keep_chunk_states(Dk, Dv, chunk_size, state_bytes, q.element_size(),
                                          launch.keep_states_max_ratio)
        h, final, saved = mlstm_forward(*flat, *gates, *state0, chunk_size, eps, keep, launch, mode)
        if grad:
            ctx.save_for_backward(*flat, *gates, h, *state0, *final, *saved)
            ctx.chunk_size, ctx.eps, ctx.shape, ctx.launch, ctx.mode = chunk_size, eps, (B, H, T, Dk, Dv), launch, mode
        C_T, n_T, m_T = final
        return h, C_T.reshape(B, H, Dk, Dv), n_T.reshape(B, H, Dk), m_T.reshape(B, H)

    @staticmethod
    def backward(ctx, dh, dC_T, dn_T, dm_T):
        from .backward import mlstm_backward

        B, H, T, Dk, Dv = ctx.shape
        q, k, v, i, f, h, C0, n0, m0, C_T, n_T, m_T, *saved = ctx.saved_tensors
        if saved[0] is None:  # the forward did not keep the chunk states: recompute them (same kernel, same values)
            from .forward import chunk_states

            saved[:3] = chunk_states(k, v, i, f, C0, n0, m0, ctx.chunk_size, ctx.launch, ctx.mode)[:3]
        BH = B * H
        dh = torch.zeros_like(h) if dh is None else dh.to(h.dtype)
        dC_T = torch.zeros_like(C_T) if dC_T is None else dC_T.reshape(BH, Dk, Dv).float().contiguous()
        dn_T = torch.zeros_like(n_T) if dn_T is None else dn_T.reshape(BH, Dk).float().contiguous()
        dm_T = torch.zeros_like(m_T) if dm_T is None else dm_T.reshape(BH).float()
        dq, dk, dv, di, df, dC0, dn0, dm0 = mlstm_backward(
            q, k, v, i, f, h, dh, dC_T, dn_T, dm_T, (C0, n0, m0), (C_T, n_T, m_T), saved, ctx.chunk_size, ctx.eps,
            ctx.launch, ctx.mode,
        )
        return (dq, dk, dv, di.reshape(B, H, T), df.reshape(B, H, T), dC0.reshape(B, H, Dk, Dv),
                dn0.reshape(B, H, Dk), dm0.reshape(B, H), None, None, None, None)


def mlstm_triton(q, k, v, i, f, state, *, chunk_size: int = 64, eps: float = 1e-6, precision: str = "auto",
                 launch: LaunchConfig | None = None):
    """Chunkwise mLSTM. q, k: (B, H, T, Dk); v: (B, H, T, Dv); i, f: (B, H, T); state (C, n, m) float32.

    q, k, v may be strided views (only their last dim must be contiguous), e.g. per-head views of one projection's
    (B, T, H * D) output: the kernels read them in place. Returns h (B, H, T, Dv) in q's dtype, stored like v (for a
    token-major v, h.transpose(1, 2) is contiguous), and the final state (float32). Differentiable in all inputs and
    the initial state. `chunk_size` is capped at 128 and at 16384 / Dk (rounded up to a power of two), so the
    intra-chunk tiles fit on chip (`kernel_chunk_size`); results do not depend on it beyond rounding. With 16-bit
    inputs the products' precision follows `precision` (one of PRECISIONS; "auto": float32 chunk states and split
    products when the initial state needs a gradient, else 16-bit chunk states). `launch` overrides launch settings
    (`LaunchConfig`; its None fields and a None `launch` take the shape-keyed defaults of `launch_config`).
    """
    require_triton()
    if q.dtype == torch.float64:
        raise ValueError("q: impl='triton' supports float32/bfloat16/float16 inputs, got float64")
    check_settings(precision, launch)
    dtype = q.dtype
    k, v = k.to(dtype), v.to(dtype)
    i, f = i.float(), f.float()  # gates stay float32 (their cumulative sums need it)
    C0, n0, m0 = (s.float() for s in state)
    L = kernel_chunk_size(chunk_size, q.shape[-1])
    config = launch_config(q.shape[-1], v.shape[-1], launch)
    h, C, n, m = _MLSTMChunkwise.apply(q, k, v, i, f, C0, n0, m0, L, eps, precision, config)
    return h, (C, n, m)


def mlstm_step_triton(q, k, v, i, f, state, *, eps: float = 1e-6, launch=None, out=None):
    """One token: q, k: (B, H, Dk); v: (B, H, Dv); i, f: (B, H); state float32. Forward only (decode). `launch`: a
    `step.StepLaunch` (None: the shape's default); `out`: (h, C, n, m) buffers to write (see `step.py`)."""
    from .step import mlstm_step_triton as _step

    return _step(q, k, v, i, f, state, eps=eps, launch=launch, out=out)
