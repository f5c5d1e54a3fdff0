"""SSD, the scalar-decay state space of Mamba-2 (arXiv 2405.21060; MATH.md "Mamba-2 (SSD)").

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
`ssd_reference` is the plain loop over t in the input dtype (the float64 reference of the tests).

`document_starts` (n, T) bool or None: S is zero before each start, so a packed row equals separate calls per document
(revival/ops/_documents.py); chunkwise, the intra-chunk sum spans one document, a document that starts inside a chunk
reads no state before it, and a chunk with a start passes none on.
"""

from __future__ import annotations

import torch

from .._checks import check_floating, check_shape
from .._documents import check_document_starts, chunk_masks
from ..linear_scan.chunkwise import compute_dtype


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
    Bh, Ch = _heads(B, H), _heads(C, H)
    S = x.new_zeros(n, H, P, N) if state is None else state.to(x.dtype)
    outputs = []
    for t in range(T):
        if document_starts is not None:
            S = torch.where(document_starts[:, t, None, None, None], 0.0, S)
        decay = torch.exp(dt[:, t] * A)  # (n, H)
        S = decay[..., None, None] * S + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        y = torch.einsum("nhpk,nhk->nhp", S, Ch[:, t])
        if D is not None:
            y = y + D[:, None] * x[:, t]
        outputs.append(y)
    return torch.stack(outputs, dim=1), S


def ssd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, state: torch.Tensor | None = None, *, chunk_size: int = 64,
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD chunkwise. Shapes as in the module doc. Returns (y (n, T, H, P), state (n, H, P, N))."""
    n, T, H, P, G, N = _validate(x, dt, A, B, C, D, state)
    document_starts = check_document_starts(document_starts, n, T, x.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size}")
    dtype = compute_dtype(x)
    xs, dts, As = x.to(dtype), dt.to(dtype), A.to(dtype)
    Bh, Ch = _heads(B.to(dtype), H), _heads(C.to(dtype), H)
    S = x.new_zeros(n, H, P, N, dtype=dtype) if state is None else state.to(dtype)
    full = (T // chunk_size) * chunk_size
    outputs = []
    for start, stop, L in ((0, full, chunk_size), (full, T, T - full)):
        if stop > start:
            starts = None if document_starts is None else document_starts[:, start:stop]
            y, S = _equal_chunks(xs[:, start:stop], dts[:, start:stop], As, Bh[:, start:stop], Ch[:, start:stop],
                                 S, L, starts)
            outputs.append(y)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    return y.to(x.dtype), S


def _equal_chunks(x, dt, A, B, C, S, L: int, document_starts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise SSD for T a multiple of L, without the D skip term. B, C already per head: (n, T, H, N)."""
    n, T, H, P = x.shape
    N = B.shape[-1]
    NC = T // L
    x = x.reshape(n, NC, L, H, P)
    dt = dt.reshape(n, NC, L, H)
    B = B.reshape(n, NC, L, H, N)
    C = C.reshape(n, NC, L, H, N)
    cum = torch.cumsum(dt * A, dim=2)  # cumulative log decay inside each chunk, (n, NC, L, H)

    # Intra-chunk: y_t += sum_{s <= t} exp(cum_t - cum_s) (C_t . B_s) dt_s x_s.
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()[None, None, :, :, None]
    if document_starts is not None:
        same, continues, to_end_mask, keeps = chunk_masks(document_starts.reshape(n, NC, L))
        causal = causal & same[..., None]
    log_decay = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (n, NC, L_t, L_s, H)
    decay = torch.exp(torch.where(causal, log_decay, torch.full_like(log_decay, float("-inf"))))
    scores = torch.einsum("nclhk,ncshk->nclsh", C, B) * decay * dt[:, :, None, :, :]
    y = torch.einsum("nclsh,ncshp->nclhp", scores, x)

    # Each chunk's own contribution to its end state, from a zero start.
    to_end = torch.exp(cum[:, :, -1:, :] - cum) * dt  # (n, NC, L, H)
    if document_starts is not None:
        to_end = to_end * to_end_mask[..., None]  # only the chunk's last document reaches its end state
    S_local = torch.einsum("nclh,nclhp,nclhk->nchpk", to_end, x, B)  # (n, NC, H, P, N)

    # Over chunks (sequential): the state before each chunk.
    chunk_decay = torch.exp(cum[:, :, -1])  # (n, NC, H)
    from_start = torch.exp(cum)[..., None]  # (n, NC, L, H, 1)
    if document_starts is not None:  # a chunk with a start passes no earlier state on; later documents read none
        chunk_decay = chunk_decay * keeps[..., None]
        from_start = from_start * continues[..., None, None]
    starts = []
    for c in range(NC):
        starts.append(S)
        S = chunk_decay[:, c, :, None, None] * S + S_local[:, c]
    starts = torch.stack(starts, dim=1)  # (n, NC, H, P, N)

    # The state before the chunk, decayed to position t, read by C_t.
    y = y + torch.einsum("nclhk,nchpk->nclhp", C, starts) * from_start
    return y.reshape(n, T, H, P), S
