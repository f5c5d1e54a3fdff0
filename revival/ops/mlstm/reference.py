"""mLSTM references: the recurrent form (one step at a time) and the parallel (quadratic) form.

Both follow docs/math.md exactly, including the stabilizer `m`: the parallel form uses the same stabilizer as the
recurrent one, `m_t = max(F_t + m_0, max_{s<=t} (F_t - F_s + i_s))`, so the two agree to rounding (not only up to
the stabilizer-dependent `eps`) and return the same final state. Inputs are assumed validated and already in the
computation dtype (float32 or float64); see `revival.ops.mlstm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def max_exponent(dtype: torch.dtype) -> float:
    """The cap on `-m` inside `normalizer`: exp of it is finite in `dtype`."""
    return math.log(torch.finfo(dtype).max) - 1.0


def normalizer(q_dot_n: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """The denominator `max(|q.n|, exp(-m)) + eps` (any shape; q_dot_n and m broadcast).

    `exp(-m)` is the unstabilized "1" of `max(|q.n|, 1)`. When the stabilizer sinks below -log(dtype max) (gates
    near -1e4), `exp(-m)` would be inf and its gradient inf * 0 = NaN; its exponent is capped there instead. The
    capped value is ~1e38 (float32) or ~1e308 (float64), so h = num / den is 0 to the dtype's precision either way.
    """
    return torch.maximum(q_dot_n.abs(), torch.exp(torch.clamp(-m, max=max_exponent(m.dtype)))) + eps


def mlstm_step_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One recurrent step. q, k: (B, H, Dk); v: (B, H, Dv); i, f: (B, H); state (C, n, m)."""
    C, n, m = state
    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)
    f_bar = torch.exp(log_f + m - m_new)
    i_bar = torch.exp(i - m_new)
    C = f_bar[..., None, None] * C + i_bar[..., None, None] * (k[..., :, None] * v[..., None, :])
    n = f_bar[..., None] * n + i_bar[..., None] * k
    q_scaled = q * q.shape[-1] ** -0.5
    numerator = torch.einsum("bhk,bhkv->bhv", q_scaled, C)
    denominator = normalizer((q_scaled * n).sum(-1), m_new, eps)
    return numerator / denominator[..., None], (C, n, m_new)


def mlstm_recurrent(q, k, v, i, f, state: MLSTMState, eps: float = 1e-6,
                    document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
    """Loop over time with `mlstm_step_reference`. q, k: (B, H, T, Dk); v: (B, H, T, Dv); i, f: (B, H, T);
    document_starts (B, T) bool or None: the state is zeroed (C, n and m) before each start."""
    outputs = []
    for t in range(q.shape[2]):
        if document_starts is not None:
            keep = ~document_starts[:, t, None]  # (B, 1), broadcast over heads
            state = tuple(torch.where(keep[(...,) + (None,) * (s.ndim - 2)], s, 0.0) for s in state)
        h, state = mlstm_step_reference(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], state, eps)
        outputs.append(h)
    return torch.stack(outputs, dim=2), state


def mlstm_parallel(q, k, v, i, f, state: MLSTMState, eps: float = 1e-6,
                   document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
    """The quadratic, attention-like form over the whole sequence (O(T^2) time and memory). With document_starts
    (B, T), input s reaches time t only inside one document, and a document that starts at r sees the zero state
    (m = 0) with log weight F_t - F_{r-1}."""
    C0, n0, m0 = state
    T = q.shape[2]
    log_f_cumsum = torch.cumsum(F.logsigmoid(f), dim=-1)  # F_t, (B, H, T)
    # log weight of input s at time t: F_t - F_s + i_s (s <= t)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    log_weights = log_f_cumsum[..., :, None] - log_f_cumsum[..., None, :] + i[..., None, :]
    log_weight_state = log_f_cumsum + m0[..., None]  # log weight of the initial state at time t
    continues = None
    if document_starts is not None:
        ids = torch.cumsum(document_starts.long(), dim=-1)[:, None]  # (B, 1, T)
        causal = causal & (ids[..., :, None] == ids[..., None, :])
        continues = ids == 0  # still the document the initial state belongs to
        steps = torch.arange(T, device=q.device)
        last_start = torch.cummax(torch.where(document_starts, steps, 0), dim=-1).values[:, None]  # (B, 1, T)
        before_start = F.pad(log_f_cumsum, (1, 0)).gather(-1, last_start.expand_as(log_f_cumsum))  # F_{r-1}
        log_weight_state = torch.where(continues, log_weight_state, log_f_cumsum - before_start)
    log_weights = torch.where(causal, log_weights, torch.full_like(log_weights, float("-inf")))
    m = torch.maximum(log_weight_state, log_weights.amax(dim=-1))  # (B, H, T)
    decay = torch.exp(log_weights - m[..., None])
    state_weight = torch.exp(log_weight_state - m)
    if continues is not None:
        state_weight = state_weight * continues  # later documents start from the zero state
    q_scaled = q * q.shape[-1] ** -0.5
    scores = (q_scaled @ k.transpose(-1, -2)) * decay
    numerator = scores @ v + state_weight[..., None] * (q_scaled @ C0)
    denominator = scores.sum(-1) + state_weight * (q_scaled @ n0[..., None]).squeeze(-1)
    denominator = normalizer(denominator, m, eps)
    h = numerator / denominator[..., None]

    # final state: the same sums at t = T - 1, kept separately per key/value
    m_last = m[..., -1].contiguous()
    input_weight = torch.exp(log_weights[..., -1, :] - m_last[..., None])  # (B, H, T)
    last_state_weight = state_weight[..., -1]
    C = last_state_weight[..., None, None] * C0 + (k * input_weight[..., None]).transpose(-1, -2) @ v
    n = last_state_weight[..., None] * n0 + (k * input_weight[..., None]).sum(dim=2)
    return h, (C, n, m_last)
