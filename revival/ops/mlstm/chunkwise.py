"""mLSTM chunkwise form: parallel inside chunks of `chunk_size`, sequential over chunk states (MATH.md).

Linear in T: O(T L (Dk + Dv) + T Dk Dv) per head. This is the pure-PyTorch CPU fast path. A sequence whose length
is not a multiple of the chunk size is handled exactly: the full chunks first, then the tail as one shorter chunk
that starts from their state (no padding).
"""

from __future__ import annotations

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
    """The chunkwise form for T a multiple of L."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = T // L
    q = q.reshape(B, H, NC, L, Dk) * Dk**-0.5
    k = k.reshape(B, H, NC, L, Dk)
    v = v.reshape(B, H, NC, L, Dv)
    i = i.reshape(B, H, NC, L)
    b = torch.cumsum(F.logsigmoid(f).reshape(B, H, NC, L), dim=-1)  # local cumulative log-forget
    g = b[..., -1]  # total log-forget of each chunk, (B, H, NC)
    a = g[..., None] - b + i  # log weight of input j in the chunk-end state, (B, H, NC, L)

    # Each chunk's own contribution to the state, stabilized by its own max.
    a_max = a.amax(dim=-1)  # (B, H, NC)
    k_weighted = k * torch.exp(a - a_max[..., None])[..., None]
    C_local = k_weighted.transpose(-1, -2) @ v  # (B, H, NC, Dk, Dv)
    n_local = k_weighted.sum(dim=-2)  # (B, H, NC, Dk)

    # Inter-chunk recurrence: the state before each chunk (sequential over NC chunks). `unbind` rather than
    # indexing: the backward of an index is a zero tensor of the full size per chunk (O(NC^2) memory traffic).
    C, n, m = state
    C_before, n_before, m_before = [], [], []
    for g_c, a_max_c, C_local_c, n_local_c in zip(g.unbind(-1), a_max.unbind(-1), C_local.unbind(2),
                                                  n_local.unbind(2)):
        C_before.append(C)
        n_before.append(n)
        m_before.append(m)
        m_new = torch.maximum(g_c + m, a_max_c)
        decay = torch.exp(g_c + m - m_new)
        scale = torch.exp(a_max_c - m_new)
        C = decay[..., None, None] * C + scale[..., None, None] * C_local_c
        n = decay[..., None] * n + scale[..., None] * n_local_c
        m = m_new
    C_before = torch.stack(C_before, dim=2)  # (B, H, NC, Dk, Dv)
    n_before = torch.stack(n_before, dim=2)  # (B, H, NC, Dk)
    m_before = torch.stack(m_before, dim=2)  # (B, H, NC)

    # Intra-chunk (parallel): query j sees the state before its chunk and inputs s <= j of its chunk.
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_decay = b[..., :, None] - b[..., None, :] + i[..., None, :]  # (B, H, NC, L, L)
    log_decay = torch.where(causal, log_decay, torch.full_like(log_decay, float("-inf")))
    log_state_weight = b + m_before[..., None]  # (B, H, NC, L)
    m_query = torch.maximum(log_state_weight, log_decay.amax(dim=-1))
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_decay - m_query[..., None])
    state_weight = torch.exp(log_state_weight - m_query)[..., None]  # (B, H, NC, L, 1)
    q_weighted = q * state_weight
    numerator = scores @ v + q_weighted @ C_before
    denominator = scores.sum(-1) + (q_weighted @ n_before[..., None]).squeeze(-1)
    denominator = normalizer(denominator, m_query, eps)
    h = numerator / denominator[..., None]
    return h.reshape(B, H, T, Dv), (C, n, m)
