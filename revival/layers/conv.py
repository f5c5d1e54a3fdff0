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

    def forward_blocks(self, blocks: list[torch.Tensor], state: torch.Tensor | None = None,
                       document_starts: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`forward` of the channel concatenation of `blocks` (each (B, T, D_i), views of one projection, say),
        returned per block: each block convolved on its own comes out contiguous, where the blocks of one output are
        strided views that kernels reading contiguous inputs copy; nor does the backward concatenate their
        gradients. Same values as forward(cat(blocks))[0].split(...); the state is the whole one. One step
        (decoding) runs one conv: copies of one token cost less than more launches."""
        sizes = [block.shape[-1] for block in blocks]
        if sum(sizes) != self.dim:
            raise ValueError(f"blocks: expected channel blocks summing to dim = {self.dim}, got sizes {sizes}")
        if blocks[0].shape[1] == 1:
            y, state = self(torch.cat(blocks, dim=-1), state, document_starts)
            return list(y.split(sizes, dim=-1)), state
        dtype = blocks[0].dtype
        weights = self.weight[:, 0, :].to(dtype).split(sizes)
        biases = [None] * len(sizes) if self.bias is None else self.bias.to(dtype).split(sizes)
        states = [None] * len(sizes) if state is None else state.to(dtype).split(sizes, dim=-1)
        outputs, new_states = [], []
        for block, weight, bias, block_state in zip(blocks, weights, biases, states):
            y, block_state = causal_conv1d(block, weight, bias, block_state, activation=self.activation,
                                           document_starts=document_starts)
            outputs.append(y)
            new_states.append(block_state)
        return outputs, torch.cat(new_states, dim=-1)
