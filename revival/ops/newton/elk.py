"""ELK's damped Newton step (Gonzalez et al. 2024): Levenberg-Marquardt solved as a Kalman smoother, in parallel.

With a diagonal Jacobian a_t and residual r_t the step minimises

    sum_t (delta_t - a_t delta_{t-1} - r_t)^2 + damping * sum_t delta_t^2,      delta_0 = 0,

the MAP estimate of a linear-Gaussian model (dynamics delta_t = a_t delta_{t-1} + r_t + N(0, 1), observations
0 = delta_t + N(0, 1 / damping)); damping = 0 is the (quasi-)Newton step. Per unit the Kalman filter variance obeys
a Riccati recursion, P_t = (a_t^2 P_{t-1} + 1) / (damping (a_t^2 P_{t-1} + 1) + 1), a Moebius map: its prefix is a
product of 2 x 2 matrices (doubling rounds, each product rescaled; a Moebius map ignores scale). Given P, the filter
mean and the Rauch-Tung-Striebel smoother are one forward and one backward linear scan. docs/math.md.
"""

from __future__ import annotations

import torch

from .scan import linear_scan

__all__ = ["elk_step", "elk_step_dense"]


def _riccati(a2: torch.Tensor, damping: float) -> torch.Tensor:
    """P_t for t = 1..T from P_0 = 0: prefix products of M_t = [[a2, 1], [damping a2, 1 + damping]] on (0, 1)."""
    T = a2.shape[1]
    m00, m01 = a2.clone(), torch.ones_like(a2)
    m10, m11 = damping * a2, torch.full_like(a2, 1.0 + damping)
    offset = 1
    while offset < T:
        later = (m00[:, offset:], m01[:, offset:], m10[:, offset:], m11[:, offset:])
        earlier = (m00[:, :-offset], m01[:, :-offset], m10[:, :-offset], m11[:, :-offset])
        n00 = later[0] * earlier[0] + later[1] * earlier[2]
        n01 = later[0] * earlier[1] + later[1] * earlier[3]
        n10 = later[2] * earlier[0] + later[3] * earlier[2]
        n11 = later[2] * earlier[1] + later[3] * earlier[3]
        scale = torch.maximum(torch.maximum(n00, n01), torch.maximum(n10, n11))  # entries >= 0
        for m, n in zip((m00, m01, m10, m11), (n00, n01, n10, n11)):
            m[:, offset:] = n / scale
        offset *= 2
    return m01 / m11


def elk_step(a: torch.Tensor, r: torch.Tensor, damping: float) -> torch.Tensor:
    """The damped step delta (shape of r) for diagonal Jacobians a and residuals r, time on dim 1."""
    if damping == 0:
        return linear_scan(a, r, structure="diagonal")
    a2 = a * a
    P = _riccati(a2, damping)
    P_prev = torch.cat((torch.zeros_like(P[:, :1]), P[:, :-1]), dim=1)
    P_pred = a2 * P_prev + 1
    keep = 1 / (1 + damping * P_pred)  # 1 - Kalman gain
    mean = linear_scan(keep * a, keep * r, structure="diagonal")
    # smoother: s_t = mean_t + G_t (s_{t+1} - a_{t+1} mean_t - r_{t+1}), G_t = P_t a_{t+1} / P_pred_{t+1}
    gain = torch.zeros_like(P)
    gain[:, :-1] = P[:, :-1] * a[:, 1:] / P_pred[:, 1:]
    rhs = mean.clone()
    rhs[:, :-1] -= gain[:, :-1] * (a[:, 1:] * mean[:, :-1] + r[:, 1:])
    return linear_scan(gain, rhs, structure="diagonal", reverse=True)


def elk_step_dense(a: torch.Tensor, r: torch.Tensor, damping: float) -> torch.Tensor:
    """The same step by solving the least-squares normal equations densely (tests only: O(T^3) per unit)."""
    B, T = r.shape[:2]
    a_flat = a.reshape(B, T, -1).transpose(1, 2)  # (B, U, T)
    r_flat = r.reshape(B, T, -1).transpose(1, 2)
    # residual operator M: (M delta)_t = delta_t - a_t delta_{t-1}
    M = torch.diag_embed(torch.ones_like(a_flat)) - torch.diag_embed(a_flat[..., 1:], offset=-1)
    normal = M.transpose(-1, -2) @ M + damping * torch.eye(T, dtype=a.dtype, device=a.device)
    delta = torch.linalg.solve(normal, (M.transpose(-1, -2) @ r_flat[..., None]))[..., 0]
    return delta.transpose(1, 2).reshape(r.shape)
