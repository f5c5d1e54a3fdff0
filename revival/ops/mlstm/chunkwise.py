"""mLSTM chunkwise form: parallel inside chunks of `chunk_size`, sequential over chunk states (MATH.md).

Linear in T: O(T L (Dk + Dv) + T Dk Dv) per head. This is the pure-PyTorch CPU fast path. A sequence whose length
is not a multiple of the chunk size is handled exactly: the full chunks first, then the tail as one shorter chunk
that starts from their state (no padding).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .reference import MLSTMState, normalizer


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    T = q.shape[2]
    full = (T // chunk_size) * chunk_size
    outputs = []
    if full > 0:
        h, state = _equal_chunks(q[:, :, :full], k[:, :, :full], v[:, :, :full], i[:, :, :full], f[:, :, :full],
                                 state, chunk_size, eps)
        outputs.append(h)
    if full < T:
        h, state = _equal_chunks(q[:, :, full:], k[:, :, full:], v[:, :, full:], i[:, :, full:], f[:, :, full:],
                                 state, T - full, eps)
        outputs.append(h)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)), state


def _equal_chunks(q, k, v, i, f, state: MLSTMState, L: int, eps: float) -> tuple[torch.Tensor, MLSTMState]:
    """The chunkwise form for T a multiple of L.

    The normalizer n rides along as an extra column of the state, `Cn = (C | n)`: (B, H, Dk, Dv + 1), with a column
    of ones appended to v. The same matmuls then produce numerator and denominator together.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = T // L
    q = q.reshape(B, H, NC, L, Dk) * Dk**-0.5
    k = k.reshape(B, H, NC, L, Dk)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1).reshape(B, H, NC, L, Dv + 1)
    i = i.reshape(B, H, NC, L)
    b = torch.cumsum(F.logsigmoid(f).reshape(B, H, NC, L), dim=-1)  # local cumulative log-forget
    g = b[..., -1]  # total log-forget of each chunk, (B, H, NC)
    a = g[..., None] - b + i  # log weight of input j in the chunk-end state, (B, H, NC, L)

    # Each chunk's own contribution to the state, stabilized by its own max.
    a_max = a.amax(dim=-1)  # (B, H, NC)
    k_weighted = k * torch.exp(a - a_max[..., None])[..., None]
    Cn_local = k_weighted.transpose(-1, -2) @ v1  # (B, H, NC, Dk, Dv + 1)

    C0, n0, m0 = state
    Cn_before, m_before, (Cn, m) = _inter_chunk(g, a_max, Cn_local, torch.cat([C0, n0[..., None]], dim=-1), m0)

    # Intra-chunk (parallel): query j sees the state before its chunk and inputs s <= j of its chunk.
    log_decay = (b[..., :, None] - b[..., None, :]) + i[..., None, :]  # (B, H, NC, L, L)
    log_decay = log_decay.masked_fill(_upper_triangle(L, q.device), float("-inf"))
    log_state_weight = b + m_before[..., None]  # (B, H, NC, L)
    # max_s<=j (b_j - b_s + i_s) as b_j + cummax(i - b): O(L) instead of a (L, L) max. The stabilizer only has to
    # bound the exponents; its rounding cancels in h (only the eps term sees it).
    m_query = torch.maximum(log_state_weight, b + torch.cummax(i - b, dim=-1).values)
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_decay - m_query[..., None])
    q_weighted = q * torch.exp(log_state_weight - m_query)[..., None]
    numerator, denominator = (scores @ v1 + q_weighted @ Cn_before).split([Dv, 1], dim=-1)
    h = numerator * normalizer(denominator.squeeze(-1), m_query, eps).reciprocal()[..., None]
    C, n = Cn.split([Dv, 1], dim=-1)
    return h.reshape(B, H, T, Dv), (C, n.squeeze(-1), m)


def _inter_chunk(g, a_max, Cn_local, Cn, m):
    """States before each chunk, sequentially. g, a_max: (B, H, NC); Cn_local: (B, H, NC, Dk, Dv + 1); Cn, m: the
    initial state. Returns Cn_before (B, H, NC, Dk, Dv + 1), m_before (B, H, NC) and the final (Cn, m).

    `unbind` rather than indexing: the backward of an index is a zero tensor of the full size per chunk.
    """
    Cn_before, m_before = [], []
    for g_c, a_max_c, Cn_local_c in zip(g.unbind(-1), a_max.unbind(-1), Cn_local.unbind(2)):
        Cn_before.append(Cn)
        m_before.append(m)
        m_new = torch.maximum(g_c + m, a_max_c)
        decay = torch.exp(g_c + m - m_new)[..., None, None]
        scale = torch.exp(a_max_c - m_new)[..., None, None]
        Cn = decay * Cn + scale * Cn_local_c
        m = m_new
    return torch.stack(Cn_before, dim=2), torch.stack(m_before, dim=2), (Cn, m)


@functools.lru_cache(maxsize=64)
def _upper_triangle(L: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True strictly above the diagonal (inputs after the query)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
