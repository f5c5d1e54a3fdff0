"""Helpers shared by the layer and model tests."""

from __future__ import annotations

import torch


def prefill_then_steps(module, inputs: torch.Tensor, prefill: int, steps_end: int | None = None):
    """`module` on inputs[:, :prefill], then one token a call up to `steps_end` (None: the end), then the rest in one
    call, the state carried throughout. Returns the outputs joined over time and the final state."""
    out, state = module(inputs[:, :prefill])
    pieces = [out]
    end = inputs.shape[1] if steps_end is None else steps_end
    for t in range(prefill, end):
        out, state = module(inputs[:, t : t + 1], state)
        pieces.append(out)
    if end < inputs.shape[1]:  # a multi-token call after steps
        out, state = module(inputs[:, end:], state)
        pieces.append(out)
    return torch.cat(pieces, dim=1), state
