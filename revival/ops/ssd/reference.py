"""SSD one step at a time, in the input dtype: the float64 reference of the tests (contract in `revival.ops.ssd`).

Inputs are validated, with B and C already per head (n, T, H, N)."""

from __future__ import annotations

import torch


def ssd_recurrent(x, dt, A, Bh, Ch, D, state, document_starts) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T (S zeroed before each document start), y_t = S_t C_t + D x_t."""
    n, _, H, P = x.shape
    S = x.new_zeros(n, H, P, Bh.shape[-1]) if state is None else state.to(x.dtype)
    outputs = []
    for t in range(x.shape[1]):
        if document_starts is not None:
            S = torch.where(document_starts[:, t, None, None, None], 0.0, S)
        decay = torch.exp(dt[:, t] * A)  # (n, H)
        S = decay[..., None, None] * S + dt[:, t, :, None, None] * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        y = torch.einsum("nhpk,nhk->nhp", S, Ch[:, t])
        if D is not None:
            y = y + D[:, None] * x[:, t]
        outputs.append(y)
    return torch.stack(outputs, dim=1), S
