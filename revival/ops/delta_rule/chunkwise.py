"""The gated delta rule chunkwise (WY form) in PyTorch: the fast path (algorithm in `revival.ops.delta_rule`'s
module doc). Inputs are validated; `scale` is resolved. Computation in float32 (float64 for float64)."""

from __future__ import annotations

import torch

from .._common import chunk_spans, compute_dtype
from .._documents import chunk_masks


def gated_delta_rule_chunkwise(q, k, v, g, beta, state, scale: float, chunk_size: int, document_starts):
    """Full chunks of `chunk_size`, then the tail as one shorter chunk; o in q's dtype, the state in float32."""
    n, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = compute_dtype(q)
    # Internal layout: heads before time.
    qs, ks, vs = (t.to(dtype).transpose(1, 2) for t in (q * scale, k, v))  # (n, H, T, D)
    gs, betas = g.to(dtype).transpose(1, 2), beta.to(dtype).transpose(1, 2)  # (n, H, T)
    S = q.new_zeros(n, H, Dk, Dv, dtype=dtype) if state is None else state.to(dtype)
    outputs = []
    for start, stop, L in chunk_spans(T, chunk_size):
        starts = None if document_starts is None else document_starts[:, start:stop]
        o, S = _equal_chunks(qs[:, :, start:stop], ks[:, :, start:stop], vs[:, :, start:stop],
                             gs[:, :, start:stop], betas[:, :, start:stop], S, L, starts)
        outputs.append(o)
    o = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return o.transpose(1, 2).to(q.dtype), S


def _equal_chunks(q, k, v, g, beta, S, L: int, document_starts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise form for T a multiple of L. q (already scaled), k: (n, H, T, Dk); v: (n, H, T, Dv)."""
    n, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = T // L
    q, k, v = q.reshape(n, H, NC, L, Dk), k.reshape(n, H, NC, L, Dk), v.reshape(n, H, NC, L, Dv)
    beta = beta.reshape(n, H, NC, L)
    gamma = torch.cumsum(g.reshape(n, H, NC, L), dim=-1)  # cumulative log decay inside each chunk

    log_decay = gamma[..., :, None] - gamma[..., None, :]  # (n, H, NC, L_t, L_s)
    ones = torch.ones(L, L, dtype=torch.bool, device=q.device)
    strict, causal = ones.tril(-1), ones.tril()
    if document_starts is not None:
        same, continues, to_end, keeps = (m[:, None] for m in chunk_masks(document_starts.reshape(n, NC, L)))
        strict, causal = strict & same, causal & same
    minus_inf = torch.full_like(log_decay, float("-inf"))
    decay_strict = torch.exp(torch.where(strict, log_decay, minus_inf))  # s < t
    decay_causal = torch.exp(torch.where(causal, log_decay, minus_inf))  # s <= t

    # WY: one unit lower triangular solve per chunk for both right-hand sides.
    M = beta[..., :, None] * decay_strict * (k @ k.transpose(-1, -2))  # strictly lower triangular
    I_plus_M = torch.eye(L, dtype=q.dtype, device=q.device) + M
    from_start = torch.exp(gamma)  # how S_0 reaches each position
    if document_starts is not None:
        from_start = from_start * continues  # a document that starts in the chunk never sees S_0
    rhs = torch.cat([(beta * from_start)[..., None] * k, beta[..., None] * v], dim=-1)  # (n, H, NC, L, Dk+Dv)
    solved = torch.linalg.solve_triangular(I_plus_M, rhs, upper=False, unitriangular=True)
    W, U0 = solved[..., :Dk], solved[..., Dk:]  # (n, H, NC, L, Dk), (n, H, NC, L, Dv)

    scores = decay_causal * (q @ k.transpose(-1, -2))  # (n, H, NC, L, L)
    q_from_start = q * from_start[..., None]
    k_to_end = k * torch.exp(gamma[..., -1:] - gamma)[..., None]
    chunk_decay = torch.exp(gamma[..., -1])  # (n, H, NC)
    if document_starts is not None:  # only the chunk's last document reaches its end state
        k_to_end = k_to_end * to_end[..., None]
        chunk_decay = chunk_decay * keeps

    outputs = []
    for c in range(NC):
        U = U0[:, :, c] - W[:, :, c] @ S  # (n, H, L, Dv)
        outputs.append(q_from_start[:, :, c] @ S + scores[:, :, c] @ U)
        S = chunk_decay[:, :, c, None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ U
    return torch.stack(outputs, dim=2).reshape(n, H, T, Dv), S
