"""Document starts for the Triton mLSTM kernels, as inputs: the kernels run packed rows unchanged.

At a start r, separate calls begin from the zero state (C, n, m) = (0, 0, 0), so (reference.py)

    m_r = max(log sigmoid(f_r), i_r),   C_r = exp(i_r - m_r) k_r v_r^T,   n_r = exp(i_r - m_r) k_r

and every later stabilizer of the document has the zero state's term F_t - F_{r-1}. The plain recurrence gives the
same values when, at r only, the input gate is i'_r = m_r, the key k'_r = exp(i_r - m_r) k_r and the forget gate
f'_r = -RESET_FORGET:

- the previous state weighs exp(-RESET_FORGET + m_{r-1} - m_r) < 2e-15, far below float32 rounding, while
  m_{r-1} - m_r < 30 (gates within +-15, as the xLSTM-7B layer's soft-capped ones);
- token r's term in every later stabilizer, F_t - F_r + i'_r, is max(F_t - F_{r-1}, F_t - F_r + i_r): the zero
  state's term and token r's own, so m is the separate call's.

Gradients reach i, f, k through i', k' by autograd. The price is rounding: inside a chunk the kernels' cumulative
log-forget passes through magnitude RESET_FORGET, ~1e-6 relative in float32 (far below the kernels' 16-bit input
precision); in float64 (the tests' check of this algebra) ~1e-13.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESET_FORGET = 64.0


def resets_as_gates(k: torch.Tensor, i: torch.Tensor, f: torch.Tensor, state, document_starts: torch.Tensor):
    """(k', i', f', state') for `mlstm` without document starts. k (B, H, T, Dk), i, f (B, H, T), state (C, n, m)
    (the rows whose document starts at t = 0 are zeroed), document_starts (B, T) bool."""
    dtype = torch.promote_types(i.dtype, torch.float32)
    i, f = i.to(dtype), f.to(dtype)
    starts = document_starts[:, None]  # (B, 1, T): every head
    m_start = torch.maximum(F.logsigmoid(f), i)
    i_reset = torch.where(starts, m_start, i)
    f_reset = torch.where(starts, torch.full_like(f, -RESET_FORGET), f)
    scale = torch.where(starts, torch.exp(i - m_start), torch.ones_like(i))
    k_reset = k * scale[..., None].to(k.dtype)
    first = document_starts[:, 0]
    state = tuple(torch.where(first.reshape(-1, *([1] * (s.ndim - 1))), 0.0, s) for s in state)
    return k_reset, i_reset, f_reset, state
