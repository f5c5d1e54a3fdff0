"""Causal depthwise 1-d convolution whose state (the last `kernel_size - 1` inputs) carries across calls.

The module holds the parameters; the computation is `revival.ops.conv.causal_conv1d` (its reference and the fast
path with a hand-written backward live there).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.conv import ACTIVATIONS, causal_conv1d


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time. forward(x: (B, T, D), state: (B, K-1, D) | None) -> (y, state).

    `activation="silu"` returns SiLU of the conv's output (the layers' `silu(conv(x))` as one autograd node); the
    returned state is always the raw inputs'."""

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = True, activation: str | None = None):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected >= 1, got {kernel_size}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.dim, self.kernel_size, self.activation = dim, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight[:, 0, :].to(x.dtype)  # (D, K)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        state = None if state is None else state.to(x.dtype)
        return causal_conv1d(x, weight, bias, state, activation=self.activation, document_starts=document_starts)
