"""sLSTM reference: a plain loop over time, one step at a time, exactly as docs/math.md ("sLSTM").

Per step, per head `h` (head dim `d`), gate order (i, f, z, o):

    raw   = x_t + R y_{t-1}                     # R block-diagonal: raw[:, g, h] += y_{t-1}[:, h] @ R[g, h]
    logfm = m_{t-1} + logsigmoid(f)
    m_t   = i                  if n_{t-1} == 0  (first step, per unit)
            max(i, logfm)      otherwise
    ibar  = exp(i - m_t);  fbar = exp(logfm - m_t)   (fbar = 0 on a first step: the memory is empty)
    c_t   = fbar c_{t-1} + ibar tanh(z)
    n_t   = fbar n_{t-1} + ibar
    y_t   = sigmoid(o) c_t / n_t

On a first step `c_{t-1} = n_{t-1} = 0`, so `fbar` multiplies zeros; it is set to 0 there (instead of
`exp(logfm - i)`, which overflows for extreme gates and would turn `0 * inf` into NaN). Ties `i == logfm` pick `i`.
Inputs are assumed validated and already in the computation dtype (float32 or float64); see `revival.ops.slstm`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def slstm_step_reference(
    x_gates_t: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState
) -> tuple[torch.Tensor, SLSTMState]:
    """One step. x_gates_t: (B, 4, H, d); recurrent_weight: (4, H, d, d); state (c, n, m, y), each (B, H, d)."""
    c, n, m, y = state
    raw = x_gates_t + torch.einsum("bhd,ghde->bghe", y, recurrent_weight)
    i, f, z, o = raw.unbind(dim=1)
    log_f_plus_m = m + F.logsigmoid(f)
    first = n == 0
    m_new = torch.where(first | (i >= log_f_plus_m), i, log_f_plus_m)
    i_bar = torch.exp(i - m_new)
    f_bar = torch.exp(torch.where(first, float("-inf"), log_f_plus_m - m_new))
    c_new = f_bar * c + i_bar * torch.tanh(z)
    n_new = f_bar * n + i_bar
    y_new = torch.sigmoid(o) * c_new / n_new
    return y_new, (c_new, n_new, m_new, y_new)


def slstm_reference(
    x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState,
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """Loop `slstm_step_reference` over time. x_gates: (B, T, 4, H, d). Returns y (B, T, H, d) and the final state.
    document_starts (B, T) bool or None: the state is zeroed before each start (a first step, as for state=None)."""
    outputs = []
    for t, x_t in enumerate(x_gates.unbind(dim=1)):
        if document_starts is not None:
            keep = ~document_starts[:, t, None, None]  # (B, 1, 1)
            state = tuple(torch.where(keep, s, 0.0) for s in state)
        y, state = slstm_step_reference(x_t, recurrent_weight, state)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state
