"""SSD, the scalar-decay state space of Mamba-2 (arXiv 2405.21060; docs/math.md "Mamba-2 (SSD)").

Per head h (group g = h // (H // G), the B/C projections are shared by the H // G heads of a group):

    a_t = exp(dt_t * A_h)                               scalar decay, A_h < 0, dt_t > 0 (already softplus'ed)
    S_t = a_t S_{t-1} + dt_t x_t B_t^T                  S: (P, N)
    y_t = S_t C_t + D_h x_t

Shapes (batch n, time T, heads H, head dim P, groups G, state size N):
    x (n, T, H, P), dt (n, T, H), A (H,), B (n, T, G, N), C (n, T, G, N), D (H,) or None (no skip term),
    state (n, H, P, N) or None (zeros)  ->  y (n, T, H, P), state (n, H, P, N).

`ssd` is chunkwise: inside a chunk of L steps, y = (C B^T * decay * dt) x in parallel plus the decayed contribution
of the state before the chunk; over chunks a loop of T / L state updates. Only exp of differences of cumulative log
decays with t >= s appear (all <= 1 when A < 0), so nothing overflows. A length that is not a multiple of the chunk
size is handled exactly (full chunks, then the tail as one shorter chunk; no padding). Computation is float32 for
half/bfloat16 inputs (float64 stays float64); y follows the input dtype, the state is float32 (float64).
`ssd_reference` is the plain loop over t in the input dtype (the float64 reference of the tests, `reference.py`);
`ssd` the chunkwise form (`chunkwise.py`).

`document_starts` (n, T) bool or None: S is zero before each start, so a packed row equals separate calls per document
(revival/ops/_documents.py); chunkwise, the intra-chunk sum spans one document, a document that starts inside a chunk
reads no state before it, and a chunk with a start passes none on.
"""

from __future__ import annotations

import torch

from .._checks import check_floating, check_shape
from .._documents import check_document_starts, drop_state_at_first_start
from .chunkwise import ssd_chunkwise
from .reference import ssd_recurrent

__all__ = ["IMPLS", "ssd", "ssd_reference"]

IMPLS = ("auto", "chunkwise", "triton")
_TRITON_MAX_DIM = 256  # the Triton kernels hold a chunk's (L, P) and (L, N) tiles whole


def _resolve_impl(impl, x, N: int) -> str:
    """"auto": the Triton kernels (`triton/`) on CUDA for 16/32-bit inputs and P, N up to 256, else "chunkwise"."""
    from .._triton import resolve_impl

    return resolve_impl(impl, x, max(x.shape[-1], N) <= _TRITON_MAX_DIM, IMPLS)


def _validate(x, dt, A, B, C, D, state) -> tuple[int, int, int, int, int, int]:
    check_floating("x", x)
    if x.ndim != 4 or x.shape[1] == 0:
        raise ValueError(f"x: expected shape (batch, T, H, P) with T >= 1, got {tuple(x.shape)}")
    n, T, H, P = x.shape
    check_shape("dt", dt, (n, T, H))
    check_shape("A", A, (H,))
    check_floating("B", B)
    if B.ndim != 4 or B.shape[:2] != (n, T):
        raise ValueError(f"B: expected shape ({n}, {T}, G, N), got {tuple(B.shape)}")
    G, N = B.shape[2], B.shape[3]
    if G == 0 or H % G != 0:
        raise ValueError(f"B: the number of groups G={G} must divide the number of heads H={H}")
    check_shape("C", C, (n, T, G, N))
    if D is not None:
        check_shape("D", D, (H,))
    if state is not None:
        check_shape("state", state, (n, H, P, N))
    return n, T, H, P, G, N


def _heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """(n, T, G, N) -> (n, T, H, N): head h reads group h // (H // G)."""
    n, T, G, N = t.shape
    return t[:, :, :, None, :].expand(n, T, G, H // G, N).reshape(n, T, H, N)


def ssd_reference(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, state: torch.Tensor | None = None, *,
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time, in the input dtype. Shapes as in the module doc."""
    n, T, H, P, G, N = _validate(x, dt, A, B, C, D, state)
    document_starts = check_document_starts(document_starts, n, T, x.device)
    return ssd_recurrent(x, dt, A, _heads(B, H), _heads(C, H), D, state, document_starts)


def ssd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, state: torch.Tensor | None = None, *, chunk_size: int = 64,
    document_starts: torch.Tensor | None = None, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD chunkwise. Shapes as in the module doc. Returns (y (n, T, H, P), state (n, H, P, N)). `impl`:
    "chunkwise" (PyTorch, `chunkwise.py`), "triton" (the kernels of `triton/`; one token without gradients takes
    the decode step kernel) or "auto" (triton where it runs, see `_resolve_impl`)."""
    n, T, H, P, G, N = _validate(x, dt, A, B, C, D, state)
    document_starts = check_document_starts(document_starts, n, T, x.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size}")
    if _resolve_impl(impl, x, N) == "triton":
        from .triton import ssd_step_triton, ssd_triton

        tensors = tuple(t for t in (x, dt, A, B, C, D, state) if t is not None)
        if T == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            state = drop_state_at_first_start(state, document_starts)
            y, state = ssd_step_triton(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
            return y[:, None], state
        return ssd_triton(x, dt, A, B, C, D, state, chunk_size=chunk_size, document_starts=document_starts)
    return ssd_chunkwise(x, dt, A, _heads(B, H), _heads(C, H), D, state, chunk_size, document_starts)
