"""Feed-forward layers: the xLSTM paper's gated MLP (sLSTM blocks) and SwiGLU (Llama / xLSTM-7B), plus init helpers.

Both are plain `forward(x: (B, T, D)) -> (B, T, D)` modules without residual or pre-norm (the block adds those).
Init follows the xLSTM reference: "small init" N(0, 2 / (5 D)) for projections reading the residual stream, "Wang init"
N(0, (2 / (num_blocks * sqrt(D)))^2) for projections writing back to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fused import swiglu
from .linear import linear_concat

__all__ = ["GatedMLP", "SwiGLU", "ffn_hidden_dim", "init_projections_", "small_init_", "wang_init_"]

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "relu": F.relu}


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Fill with N(0, 2 / (5 dim)) ("small init", Nguyen & Salazar 2019), dim = width of the residual stream."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int = 1) -> torch.Tensor:
    """Fill with N(0, (2 / (num_blocks sqrt(dim)))^2) (GPT-J / Wang init), for output projections."""
    return nn.init.normal_(weight, mean=0.0, std=2.0 / (num_blocks * math.sqrt(dim)))


def init_projections_(reading: tuple[nn.Linear, ...], out: nn.Linear, dim: int, num_blocks: int = 1) -> None:
    """Small init for the projections `reading` the residual stream (in order), Wang init (depth `num_blocks`) for
    the output projection `out`, zero biases."""
    for linear in reading:
        small_init_(linear.weight, dim)
    wang_init_(out.weight, dim, num_blocks)
    for linear in (*reading, out):
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


def round_up(value: float, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= value."""
    return int(math.ceil(value / multiple) * multiple)


def ffn_hidden_dim(d_model: int, proj_factor: float = 2.667, multiple_of: int = 64) -> int:
    """Hidden width of an FFN: round_up(proj_factor * d_model, multiple_of) (xLSTM-7B: 4096 -> 10944)."""
    if multiple_of < 1:
        raise ValueError(f"multiple_of: expected >= 1, got {multiple_of}")
    return round_up(proj_factor * d_model, multiple_of)


class GatedMLP(nn.Module):
    """The xLSTM paper's gated feed-forward: y = W_down(act(gate) * up), (gate, up) = split(W_up x).

    hidden = round_up(proj_factor * d_model, round_to); proj_up: D -> 2 * hidden (gate first, then up);
    proj_down: hidden -> D. x: (B, T, D) (any leading dims) -> (B, T, D).
    """

    def __init__(self, d_model: int, proj_factor: float = 4 / 3, activation: str = "gelu", round_to: int = 64,
                 bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.d_model = d_model
        self.hidden_dim = ffn_hidden_dim(d_model, proj_factor, round_to)
        self.activation = activation
        self.proj_up = nn.Linear(d_model, 2 * self.hidden_dim, bias=bias)
        self.proj_down = nn.Linear(self.hidden_dim, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init for proj_up, Wang init (depth `num_blocks`) for proj_down, zero biases."""
        init_projections_((self.proj_up,), self.proj_down, self.d_model, num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dim {self.d_model}, got shape {tuple(x.shape)}")
        gate, up = self.proj_up(x).split(self.hidden_dim, dim=-1)
        return self.proj_down(ACTIVATIONS[self.activation](gate) * up)


class SwiGLU(nn.Module):
    """Llama / xLSTM-7B feed-forward: y = proj_down(silu(proj_up_gate(x)) * proj_up(x)).

    Parameter names mirror the Hugging Face xLSTM layout (proj_up_gate, proj_up, proj_down).
    x: (B, T, D) (any leading dims) -> (B, T, D).
    """

    def __init__(self, d_model: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim: expected >= 1, got {hidden_dim}")
        self.d_model, self.hidden_dim = d_model, hidden_dim
        self.proj_up_gate = nn.Linear(d_model, hidden_dim, bias=bias)
        self.proj_up = nn.Linear(d_model, hidden_dim, bias=bias)
        self.proj_down = nn.Linear(hidden_dim, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init for the two up projections, Wang init (depth `num_blocks`) for proj_down, zero biases."""
        init_projections_((self.proj_up_gate, self.proj_up), self.proj_down, self.d_model, num_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dim {self.d_model}, got shape {tuple(x.shape)}")
        return self.proj_down(swiglu(linear_concat(x, [self.proj_up_gate, self.proj_up])))
