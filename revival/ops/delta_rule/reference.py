"""The gated delta rule one step at a time, in the input dtype: the float64 reference of the tests (contract in
`revival.ops.delta_rule`). Inputs are validated; `scale` is resolved."""

from __future__ import annotations

import torch


def gated_delta_rule_recurrent(q, k, v, g, beta, state, scale: float, document_starts):
    """S_t = exp(g_t) S_{t-1}, then the delta update S_t += k_t (beta_t (v_t - S_t^T k_t))^T; o_t = S_t^T q_t scale.
    S is zeroed before each document start."""
    n, T, H, Dk = q.shape
    S = q.new_zeros(n, H, Dk, v.shape[-1]) if state is None else state.to(q.dtype)
    outputs = []
    for t in range(T):
        if document_starts is not None:
            S = torch.where(document_starts[:, t, None, None, None], 0.0, S)
        S = torch.exp(g[:, t])[..., None, None] * S
        kt, vt = k[:, t], v[:, t]  # (n, H, Dk), (n, H, Dv)
        u = beta[:, t, :, None] * (vt - torch.einsum("nhkv,nhk->nhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        outputs.append(torch.einsum("nhkv,nhk->nhv", S, q[:, t] * scale))
    return torch.stack(outputs, dim=1), S
