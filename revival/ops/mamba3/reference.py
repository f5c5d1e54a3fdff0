"""Mamba-3 one step at a time, in the input dtype: the float64 reference of the tests (contract in
`revival.ops.mamba3`).

The state is carried in the model's own frame (h = R(phi) g, the rotation applied to the state at every step), not
in the rotating frame of the chunkwise form, so the tests check the data-dependent RoPE identity as well."""

from __future__ import annotations

import torch


def rotate(v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """R(angle) v on the last dim, in pairs (v_i, v_{i + N/2}) by angle_i; angle broadcasts against v[..., :N/2]."""
    first, second = v.chunk(2, dim=-1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def mamba3_recurrent(x, dt, A, lam, B, C, theta, D, state, document_starts=None) -> tuple[torch.Tensor, tuple]:
    """h_t = a_t R_t h_{t-1} + b_t R_t x_{t-1} B_{t-1}^T + c_t x_t B_t^T (summed over the R ranks), y_t = h_t C_t;
    the whole state (angle, h, previous B and x) zeroed before each document start."""
    T = x.shape[1]
    angle, g, prev_B, prev_x = state
    angle = angle.to(x.dtype)
    h = rotate(g.to(x.dtype), angle[:, :, None, :])  # the model's frame: h = R(phi) g
    prev_B, prev_x = prev_B.to(x.dtype), prev_x.to(x.dtype)
    outputs = []
    for t in range(T):
        if document_starts is not None:
            starts = document_starts[:, t]
            angle = torch.where(starts[:, None, None], 0.0, angle)
            h = torch.where(starts[:, None, None, None], 0.0, h)
            prev_B = torch.where(starts[:, None, None, None], 0.0, prev_B)
            prev_x = torch.where(starts[:, None, None, None], 0.0, prev_x)
        step = dt[:, t, :, None] * theta[:, t]  # (n, H, N/2)
        angle = angle + step
        alpha = torch.exp(dt[:, t] * A)  # (n, H)
        beta = (1 - lam[:, t]) * dt[:, t] * alpha
        gamma = lam[:, t] * dt[:, t]
        previous = torch.einsum("nhrp,nhrk->nhpk", prev_x, prev_B)
        current = torch.einsum("nhrp,nhrk->nhpk", x[:, t], B[:, t])
        h = (alpha[..., None, None] * rotate(h, step[:, :, None, :]) + beta[..., None, None] *
             rotate(previous, step[:, :, None, :]) + gamma[..., None, None] * current)
        y = torch.einsum("nhpk,nhrk->nhrp", h, C[:, t])
        if D is not None:
            y = y + D[:, None, None] * x[:, t]
        outputs.append(y)
        prev_B, prev_x = B[:, t], x[:, t]
    g = rotate(h, -angle[:, :, None, :])
    return torch.stack(outputs, dim=1), (angle, g, prev_B, prev_x)
