"""Mamba-3's state space (arXiv 2603.15569; docs/math.md): exponential-trapezoidal discretisation, a rotating
(complex) state through data-dependent RoPE on B and C, and MIMO inputs of rank R.

Per head h, with R ranks r (R = 1 is SISO) and the state h_t: (P, N) in the model's frame:

    phi_t = phi_{t-1} + dt_t theta_t                       the angles, N/2 per head (pairs (i, i + N/2) rotate)
    a_t = exp(dt_t A_h),  b_t = (1 - lam_t) dt_t a_t,  c_t = lam_t dt_t      trapezoid weights, lam_t in [0, 1]
    h_t = a_t R(dt_t theta_t) h_{t-1} + b_t R(dt_t theta_t) sum_r x_{t-1,r} B_{t-1,r}^T + c_t sum_r x_{t,r} B_{t,r}^T
    y_{t,r} = h_t C_{t,r} + D_h x_{t,r}

lam = 1 is Mamba-2's exponential-Euler step (SSD). In the rotating frame g_t = R(phi_t)^T h_t the rotation moves onto
the inputs (B~ = R(phi)^T B, C~ = R(phi)^T C) and the step is a scalar-decay SSM whose input has rank 2R (the current
and the previous token): `mamba3` computes that chunkwise (`chunkwise.py`; for SISO, `impl="triton"` or "auto" on
CUDA, as SSD on 2H heads with SSD's Triton kernels, `triton.py`), `mamba3_reference` the recurrence above one step at
a time (`reference.py`, the float64 reference of the tests).

Shapes (batch n, time T, heads H, ranks R, head dim P, state size N even):
    x (n, T, H, R, P), dt (n, T, H) > 0, A (H,) < 0, lam (n, T, H), B and C (n, T, H, R, N), theta (n, T, H, N/2),
    D (H,) or None, state None (zeros) or (angle (n, H, N/2), ssm (n, H, P, N) = g in the rotating frame,
    previous B (n, H, R, N) as given, previous x (n, H, R, P))  ->  y (n, T, H, R, P), the state at T (same layout).
`document_starts` (n, T) bool or None: the whole state (angle, memory, previous token) is zero before each start,
so a packed row equals separate calls per document (revival/ops/_documents.py). The state's size does not depend
on T. Computation is float32 for 16-bit inputs (float64 stays float64); y follows
the input dtype, the state is float32 (float64).
"""

from __future__ import annotations

import torch

from .._checks import check_floating, check_shape
from .._common import compute_dtype
from .._documents import check_document_starts
from .chunkwise import mamba3_chunkwise
from .reference import mamba3_recurrent, rotate

__all__ = ["IMPLS", "mamba3", "mamba3_reference", "rotate", "zero_state"]

IMPLS = ("auto", "chunkwise", "triton")
_TRITON_MAX_DIM = 256  # the SSD kernels hold a chunk's (L, P) and (L, N) tiles whole


def zero_state(n: int, H: int, R: int, P: int, N: int, *, device=None, dtype=torch.float32) -> tuple:
    """The state before the first token: no angle, no memory, no previous token."""
    return (torch.zeros(n, H, N // 2, device=device, dtype=dtype), torch.zeros(n, H, P, N, device=device, dtype=dtype),
            torch.zeros(n, H, R, N, device=device, dtype=dtype), torch.zeros(n, H, R, P, device=device, dtype=dtype))


def _validate(x, dt, A, lam, B, C, theta, D, state) -> tuple:
    check_floating("x", x)
    if x.ndim != 5 or x.shape[1] == 0:
        raise ValueError(f"x: expected shape (batch, T, H, R, P) with T >= 1, got {tuple(x.shape)}")
    n, T, H, R, P = x.shape
    check_shape("dt", dt, (n, T, H))
    check_shape("A", A, (H,))
    check_shape("lam", lam, (n, T, H))
    check_shape("B", B, (n, T, H, R, None))
    N = B.shape[-1]
    if N % 2:
        raise ValueError(f"B: expected an even state size N (the angles rotate pairs), got N = {N}")
    check_shape("C", C, (n, T, H, R, N))
    check_shape("theta", theta, (n, T, H, N // 2))
    if D is not None:
        check_shape("D", D, (H,))
    if state is None:
        return zero_state(n, H, R, P, N, device=x.device, dtype=compute_dtype(x))
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        raise ValueError("state: expected None or a tuple (angle, ssm, previous B, previous x), got "
                         f"{type(state).__name__}")
    for name, tensor, shape in zip(("state angle", "state ssm", "state previous B", "state previous x"), state,
                                   ((n, H, N // 2), (n, H, P, N), (n, H, R, N), (n, H, R, P))):
        check_shape(name, tensor, shape)
    return tuple(state)


def mamba3_reference(x, dt, A, lam, B, C, theta, D=None, state=None, *,
                     document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
    """The recurrence one step at a time, in the input dtype. Shapes as in the module doc."""
    state = _validate(x, dt, A, lam, B, C, theta, D, state)
    document_starts = check_document_starts(document_starts, x.shape[0], x.shape[1], x.device)
    return mamba3_recurrent(x, dt, A, lam, B, C, theta, D, state, document_starts)


def _resolve_impl(impl, x, N: int) -> str:
    """"auto": the Triton path (`triton.py`, SSD's kernels) on CUDA for SISO (R = 1), 16/32-bit inputs and P, N up
    to 256, else "chunkwise"; "triton" with R > 1 is refused (MIMO runs chunkwise)."""
    from .._triton import resolve_impl

    R, P = x.shape[3], x.shape[4]
    impl = resolve_impl(impl, x, R == 1 and max(P, N) <= _TRITON_MAX_DIM, IMPLS)
    if impl == "triton":
        from .triton import check_siso

        check_siso(x)
    return impl


def mamba3(x, dt, A, lam, B, C, theta, D=None, state=None, *, chunk_size: int = 64,
           document_starts: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, tuple]:
    """Mamba-3 chunkwise. Shapes as in the module doc. Returns (y (n, T, H, R, P), state). `impl`: "chunkwise"
    (PyTorch, `chunkwise.py`), "triton" (SISO only: SSD's Triton kernels, `triton.py`; one token without gradients
    takes SSD's decode step kernel) or "auto" (triton where it runs, see `_resolve_impl`)."""
    given_state = state
    state = _validate(x, dt, A, lam, B, C, theta, D, state)
    document_starts = check_document_starts(document_starts, x.shape[0], x.shape[1], x.device)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if _resolve_impl(impl, x, B.shape[-1]) == "triton":
        from .triton import mamba3_step_triton, mamba3_triton

        tensors = (x, dt, A, lam, B, C, theta, D, *(given_state or ()))
        if x.shape[1] == 1 and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                     for t in tensors)):
            return mamba3_step_triton(x, dt, A, lam, B, C, theta, D, state, document_starts=document_starts)
        return mamba3_triton(x, dt, A, lam, B, C, theta, D, state, chunk_size=chunk_size,
                             document_starts=document_starts)
    y, state = mamba3_chunkwise(x, dt, A, lam, B, C, theta, D, state, chunk_size, document_starts)
    return y.to(x.dtype), state
