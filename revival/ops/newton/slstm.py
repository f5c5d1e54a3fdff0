"""The sLSTM through the Newton solver: `revival.ops.slstm(..., impl="newton")` lands here.

The solver's state per head is [l, u, y] (cells.SLSTM): l = m + log n (log of the normaliser), u = c / n. It maps
to the op's (c, n, m, y) state and back exactly: an empty memory (n = 0) is l = -inf; a state returned from here
is (c, n, m, y) = (u, 1, l, y), the same memory with the stabiliser at m = l (continuing from it with any impl gives
the same outputs as continuing from the sequential op's own state).
"""

from __future__ import annotations

import torch

from .cells import SLSTM
from .solver import NewtonResult, newton_solve

__all__ = ["slstm_newton", "slstm_state_from_newton", "slstm_state_to_newton"]


def slstm_state_to_newton(state) -> torch.Tensor:
    """(c, n, m, y) each (B, H, d) -> (B, H, 3d) = [l, u, y]."""
    c, n, m, y = state
    empty = n == 0
    safe_n = torch.where(empty, torch.ones_like(n), n)
    log_n = torch.where(empty, torch.full_like(m, float("-inf")), m + torch.log(safe_n))
    u = torch.where(empty, torch.zeros_like(c), c / safe_n)
    return torch.cat((log_n, u, y), dim=-1)


def slstm_state_from_newton(h: torch.Tensor) -> tuple:
    log_n, u, y = h.chunk(3, dim=-1)
    return u, torch.ones_like(u), log_n, y


def slstm_newton(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state, **solver_options
                 ) -> tuple[torch.Tensor, tuple, NewtonResult]:
    """x_gates (B, T, 4, H, d), recurrent_weight (4, H, d, d), state (c, n, m, y) each (B, H, d), all in the
    computation dtype. Returns y (B, T, H, d), the final state and the solver's record. `document_starts` (B, T)
    bool, among the solver options: each start restarts from the empty memory (what the op's zero state is)."""
    h, result = newton_solve(SLSTM, x_gates, slstm_state_to_newton(state), (recurrent_weight,), **solver_options)
    d = recurrent_weight.shape[-1]
    return h[..., 2 * d:], slstm_state_from_newton(h[:, -1]), result
