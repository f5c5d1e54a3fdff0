"""The sequential loop: h_t = cell.step(h_{t-1}, x_t, *weights) for t = 1..T, one step at a time, with autograd.

What the Newton solver must agree with (float64: ~1e-10) and what it falls back to when asked. Shapes as
`revival.ops.newton.newton_solve`: x (B, T, ...), h0 (B, *S); returns h (B, T, *S).
"""

from __future__ import annotations

import torch

from .cells import Cell

__all__ = ["sequential_solve"]


def sequential_solve(cell: Cell, x: torch.Tensor, h0: torch.Tensor, weights: tuple = (),
                     document_starts: torch.Tensor | None = None) -> torch.Tensor:
    """document_starts: (B, T) bool or None; the state is the cell's empty state (zeros) before each start."""
    h, outputs = h0, []
    for t in range(x.shape[1]):
        if document_starts is not None:
            h = cell.restart(h, document_starts[:, t].reshape(-1, *(1,) * (h.ndim - 1)))
        h = cell.step(h[:, None], x[:, t:t + 1], *weights)[:, 0]
        outputs.append(h)
    return torch.stack(outputs, dim=1)
