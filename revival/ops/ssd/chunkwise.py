"""SSD chunkwise in PyTorch (the fast path; the algorithm in `revival.ops.ssd`'s module doc).

Inputs are validated, with B and C already per head (n, T, H, N). Computation in float32 (float64 for float64)."""

from __future__ import annotations

import torch

from .._common import chunk_spans, compute_dtype
from .._documents import chunk_masks


def ssd_chunkwise(x, dt, A, Bh, Ch, D, state, chunk_size: int, document_starts) -> tuple[torch.Tensor, torch.Tensor]:
    """Full chunks of `chunk_size`, then the tail as one shorter chunk; y in x's dtype, the state in float32."""
    n, T, H, P = x.shape
    N = Bh.shape[-1]
    dtype = compute_dtype(x)
    xs, dts, As, Bh, Ch = x.to(dtype), dt.to(dtype), A.to(dtype), Bh.to(dtype), Ch.to(dtype)
    S = x.new_zeros(n, H, P, N, dtype=dtype) if state is None else state.to(dtype)
    outputs = []
    for start, stop, L in chunk_spans(T, chunk_size):
        starts = None if document_starts is None else document_starts[:, start:stop]
        y, S = _equal_chunks(xs[:, start:stop], dts[:, start:stop], As, Bh[:, start:stop], Ch[:, start:stop], S, L,
                             starts)
        outputs.append(y)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * xs
    return y.to(x.dtype), S


def intra_chunk_decay(cum: torch.Tensor, document_starts=None):
    """The decay inside each chunk, exp(cum_t - cum_s) for key s <= query t of one document and 0 elsewhere:
    (n, NC, L_t, L_s, H) from the cumulative log decay `cum` (n, NC, L, H). Also `chunk_masks` of `document_starts`
    (n, T) chunked like cum, or None without."""
    n, NC, L, _ = cum.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=cum.device).tril()[None, None, :, :, None]
    masks = None
    if document_starts is not None:
        masks = chunk_masks(document_starts.reshape(n, NC, L))
        causal = causal & masks[0][..., None]
    log_decay = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (n, NC, L_t, L_s, H)
    return torch.exp(torch.where(causal, log_decay, torch.full_like(log_decay, float("-inf")))), masks


def states_before_chunks(S: torch.Tensor, chunk_decay: torch.Tensor, S_local: torch.Tensor):
    """Sequential over chunks: the state before each chunk (n, NC, H, P, N) and the final state, from the state
    before the first S (n, H, P, N), each chunk's decay (n, NC, H) and its own contribution S_local (n, NC, H, P, N)."""
    starts = []
    for c in range(chunk_decay.shape[1]):
        starts.append(S)
        S = chunk_decay[:, c, :, None, None] * S + S_local[:, c]
    return torch.stack(starts, dim=1), S


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
    decay, masks = intra_chunk_decay(cum, document_starts)
    if masks is not None:
        _, continues, to_end_mask, keeps = masks
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
    starts, S = states_before_chunks(S, chunk_decay, S_local)

    # The state before the chunk, decayed to position t, read by C_t.
    y = y + torch.einsum("nclhk,nchpk->nclhp", C, starts) * from_start
    return y.reshape(n, T, H, P), S
