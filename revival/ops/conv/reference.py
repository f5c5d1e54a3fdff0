"""The causal depthwise conv by its definition, one output step at a time: the float64 reference of the tests.

y_t = sum_j weight[:, j] * padded[t + j] + bias with padded = cat(state, x) along time, where with document starts
only the inputs of the output's own document count (the carried state belongs to the first document)."""

from __future__ import annotations

import torch


def causal_conv1d_reference(x, weight, bias=None, state=None, document_starts=None):
    """x (B, T, D), weight (D, K), bias (D,) or None, state (B, K-1, D) or None (zeros), document_starts (B, T) bool
    or None -> (y (B, T, D), the new state (B, K-1, D): the last K-1 inputs, zero where they are of an earlier
    document than the last step's)."""
    B, T, D = x.shape
    K = weight.shape[1]
    padded = torch.cat([x.new_zeros(B, K - 1, D) if state is None else state, x], dim=1)
    ids = torch.zeros(B, T, dtype=torch.long, device=x.device)
    if document_starts is not None:
        ids = torch.cumsum(document_starts.long(), dim=1)
    padded_ids = torch.cat([ids.new_zeros(B, K - 1), ids], dim=1)
    outputs = []
    for t in range(T):
        same = (padded_ids[:, t:t + K] == ids[:, t:t + 1])[..., None]  # (B, K, 1)
        window = padded[:, t:t + K] * same  # (B, K, D)
        y = (window * weight.t()[None]).sum(dim=1)
        outputs.append(y if bias is None else y + bias)
    new_state = padded[:, T:] * (padded_ids[:, T:] == ids[:, -1:])[..., None]
    return torch.stack(outputs, dim=1), new_state
