"""Mamba-3 chunkwise in PyTorch (the fast path; the algorithm in `revival.ops.mamba3`'s module doc).

Inputs are validated, the state given whole. Computation in float32 (float64 for float64)."""

from __future__ import annotations

import torch

from .._common import chunk_spans, compute_dtype
from .reference import rotate


def mamba3_chunkwise(x, dt, A, lam, B, C, theta, D, state, chunk_size: int) -> tuple[torch.Tensor, tuple]:
    """RoPE on B and C by the cumulative angle, the trapezoid as a rank-2R input, then scalar-decay chunks."""
    n, T, H, R, P = x.shape
    dtype = compute_dtype(x)
    x, dt, A, lam, B, C, theta = (t.to(dtype) for t in (x, dt, A, lam, B, C, theta))
    angle0, g, prev_B, prev_x = (t.to(dtype) for t in state)
    angle = angle0[:, None] + torch.cumsum(dt[..., None] * theta, dim=1)  # phi_t, (n, T, H, N/2)
    B_rot = rotate(B, -angle[:, :, :, None, :])  # R(phi_t)^T B_t: the state's rotating frame
    C_rot = rotate(C, -angle[:, :, :, None, :])
    B_prev = torch.cat([rotate(prev_B, -angle0[:, :, None, :])[:, None], B_rot[:, :-1]], dim=1)
    x_prev = torch.cat([prev_x[:, None], x[:, :-1]], dim=1)
    alpha = torch.exp(dt * A)
    beta = ((1 - lam) * dt * alpha)[..., None, None]
    gamma = (lam * dt)[..., None, None]
    inputs = torch.cat([gamma * x, beta * x_prev], dim=3)  # (n, T, H, 2R, P): current and previous terms
    keys = torch.cat([B_rot, B_prev], dim=3)  # (n, T, H, 2R, N)
    log_decay = dt * A
    outputs = []
    for start, stop, L in chunk_spans(T, chunk_size):
        y, g = _equal_chunks(inputs[:, start:stop], keys[:, start:stop], C_rot[:, start:stop],
                             log_decay[:, start:stop], g, L)
        outputs.append(y)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if D is not None:
        y = y + D.to(dtype)[:, None, None] * x
    return y, (angle[:, -1], g, B[:, -1], x[:, -1])


def _equal_chunks(inputs, keys, queries, log_decay, S, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = exp(log_decay_t) S_{t-1} + sum_k inputs_{t,k} keys_{t,k}^T, y_{t,r} = S_t queries_{t,r}; T = NC * L."""
    n, T, H, K, P = inputs.shape
    R, N = queries.shape[3], queries.shape[4]
    NC = T // L
    inputs = inputs.reshape(n, NC, L, H, K, P)
    keys = keys.reshape(n, NC, L, H, K, N)
    queries = queries.reshape(n, NC, L, H, R, N)
    cum = torch.cumsum(log_decay.reshape(n, NC, L, H), dim=2)

    # Intra-chunk: y_t += sum_{s <= t} exp(cum_t - cum_s) sum_k (q_t . keys_{s,k}) inputs_{s,k}.
    causal = torch.ones(L, L, dtype=torch.bool, device=inputs.device).tril()[None, None, :, :, None]
    differences = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (n, NC, L_t, L_s, H)
    decay = torch.exp(torch.where(causal, differences, torch.full_like(differences, float("-inf"))))
    scores = torch.einsum("nclhrk,ncshqk->nclshrq", queries, keys) * decay[..., None, None]
    y = torch.einsum("nclshrq,ncshqp->nclhrp", scores, inputs)

    # Each chunk's own contribution to its end state, and the state before each chunk (sequential over chunks).
    to_end = torch.exp(cum[:, :, -1:, :] - cum)  # (n, NC, L, H)
    S_local = torch.einsum("nclh,nclhqp,nclhqk->nchpk", to_end, inputs, keys)
    chunk_decay = torch.exp(cum[:, :, -1])
    starts = []
    for c in range(NC):
        starts.append(S)
        S = chunk_decay[:, c, :, None, None] * S + S_local[:, c]
    starts = torch.stack(starts, dim=1)  # (n, NC, H, P, N)
    y = y + torch.einsum("nclhrk,nchpk->nclhrp", queries, starts) * torch.exp(cum)[..., None, None]
    return y.reshape(n, T, H, R, P), S
