"""Causal depthwise 1-d convolution whose state (the last `kernel_size - 1` inputs) carries across calls."""

from __future__ import annotations

import math

import torch
from torch import nn


class CausalConv1d(nn.Module):
    """Depthwise causal conv over time. forward(x: (B, T, D), state: (B, K-1, D) | None) -> (y, state)."""

    def __init__(self, dim: int, kernel_size: int = 4, bias: bool = True):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size: expected >= 1, got {kernel_size}")
        self.dim, self.kernel_size = dim, kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, D)
        elif state.shape != (B, K - 1, D):
            raise ValueError(f"state: expected shape {(B, K - 1, D)}, got {tuple(state.shape)}")
        padded = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K - 1 + T, D)
        # K shifted multiply-adds in (B, T, D) layout: y_t = sum_j w[:, j] * padded[t + j] (+ bias). Cheaper than a
        # depthwise conv1d call for short inputs (decoding) and no slower for long ones on CPU.
        weight = self.weight[:, 0, :].to(x.dtype)  # (D, K)
        y = padded[:, :T] * weight[:, 0]
        for j in range(1, K):
            y = torch.addcmul(y, padded[:, j : j + T], weight[:, j])
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y, padded[:, padded.shape[1] - (K - 1):]
