"""The minGRU / minLSTM recurrences and the bare linear recurrence as plain loops over time, in the input dtype: the
float64 references of the tests, independent of the log-space algebra of the fast paths (`revival.ops.linear_scan`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import validate_recurrence


def g(x: torch.Tensor) -> torch.Tensor:
    """The positive activation of the paper: x + 0.5 for x >= 0, sigmoid(x) otherwise (continuous at 0)."""
    return torch.where(x >= 0, F.relu(x) + 0.5, torch.sigmoid(x))


def linear_recurrence_reference(
    log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_a_t) * h_{t-1} + b_t, one step at a time, in the input dtype. Shapes as in the module doc."""
    validate_recurrence(log_a, b, h0)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.to(b.dtype)
    outputs = []
    for t in range(b.shape[1]):
        h = torch.exp(log_a[:, t]) * h + b[:, t]
        outputs.append(h)
    return torch.stack(outputs, dim=1), h


def mingru_reference(gate, hidden, h0, document_starts=None):
    """minGRU by its equations, one step at a time in the input dtype (state zeroed before each document start)."""
    h = torch.zeros_like(gate[:, 0]) if h0 is None else h0.to(gate.dtype)
    outputs = []
    for t in range(gate.shape[1]):
        if document_starts is not None:
            h = torch.where(document_starts[:, t, None], 0.0, h)
        z = torch.sigmoid(gate[:, t])
        h = (1 - z) * h + z * g(hidden[:, t])
        outputs.append(h)
    return torch.stack(outputs, dim=1), h


def minlstm_reference(forget, input, hidden, h0, document_starts=None):
    """minLSTM by its equations (sigmoids and their ratios), one step at a time in the input dtype."""
    h = torch.zeros_like(forget[:, 0]) if h0 is None else h0.to(forget.dtype)
    outputs = []
    for t in range(forget.shape[1]):
        if document_starts is not None:
            h = torch.where(document_starts[:, t, None], 0.0, h)
        f, i = torch.sigmoid(forget[:, t]), torch.sigmoid(input[:, t])
        h = f / (f + i) * h + i / (f + i) * g(hidden[:, t])
        outputs.append(h)
    return torch.stack(outputs, dim=1), h
