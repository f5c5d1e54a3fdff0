"""Mamba-3 mixer layer (arXiv 2603.15569; docs/math.md): in-projection, no short convolution, normalised B/C
with biases, the Mamba-3 state space (trapezoidal, rotating state, MIMO), gated RMSNorm, out-projection.

    (z, x, B, C, dt_raw, lam_raw, theta) = W_in x     z, x: d_inner = expand * d_model; B, C: mimo_rank * d_state,
                                                      shared by the heads; dt_raw, lam_raw: one per head;
                                                      theta: d_state / 2 angles per token, shared by the heads
    B = RMSNorm(B) + B_bias_h, C = RMSNorm(C) + C_bias_h               per head biases (H, R, N), initialised to 1
    dt = softplus(dt_raw + dt_bias); A = -exp(A_log); lam = sigmoid(lam_raw)
    X_r = x * W_x[r] (R ranks from one x, MIMO)     y = Mamba3(X, dt, A, lam, B, C, theta, D)  (revival.ops.mamba3)
    y = sum_r W_y[r] * y_r;  y = W_out RMSNorm(y * silu(z))

The mixer only (no residual, outer norm or MLP). forward(x: (B, T, d_model), state=None) -> (y, state) with the op's
state (angle (B, H, d_state / 2), ssm (B, H, head_dim, d_state), previous B (B, H, R, d_state), previous x
(B, H, R, head_dim)) in float32 (float64 for float64 weights); constant in T. mimo_rank = 1 is SISO (no W_x, W_y).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fused import gated_head_norm
from ..ops.mamba3 import mamba3
from .ffn import init_projections_
from .kinds import LayerKind, LayerOptions
from .mamba2 import Mamba2Options, init_decay_
from .norms import MultiHeadNorm, RMSNorm

__all__ = ["Mamba3"]


class Mamba3(nn.Module):
    """Mamba-3 mixer (see the module doc for the equations and the state)."""

    def __init__(self, d_model: int, *, d_state: int = 64, expand: int = 2, head_dim: int = 64, mimo_rank: int = 1,
                 chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_init_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = 1e-5, bias: bool = False):
        super().__init__()
        d_inner = expand * d_model
        if head_dim < 1 or d_inner % head_dim:
            raise ValueError(f"head_dim: expected a divisor of d_inner = expand * d_model = {d_inner}, got {head_dim}")
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state: expected an even number >= 2 (the angles rotate pairs), got {d_state}")
        if mimo_rank < 1:
            raise ValueError(f"mimo_rank: expected an int >= 1, got {mimo_rank}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {A_init_range}")
        num_heads = d_inner // head_dim
        self.d_model, self.d_inner, self.d_state, self.head_dim = d_model, d_inner, d_state, head_dim
        self.num_heads, self.mimo_rank, self.chunk_size = num_heads, mimo_rank, chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range = dt_min, dt_max, dt_init_floor, A_init_range
        R, N = mimo_rank, d_state
        self.split_sizes = [d_inner, d_inner, R * N, R * N, num_heads, num_heads, N // 2]  # z x B C dt lam theta
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=bias)
        self.B_norm = RMSNorm(N, eps=norm_eps)
        self.C_norm = RMSNorm(N, eps=norm_eps)
        self.B_bias = nn.Parameter(torch.empty(num_heads, R, N))
        self.C_bias = nn.Parameter(torch.empty(num_heads, R, N))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.mimo_x = nn.Parameter(torch.empty(num_heads, R, head_dim)) if R > 1 else None
        self.mimo_y = nn.Parameter(torch.empty(num_heads, R, head_dim)) if R > 1 else None
        self.norm = MultiHeadNorm(1, d_inner, eps=norm_eps, kind="rms")
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init in, Wang init out, Mamba's dt_bias / A_log, D = 1, B/C biases 1, W_x = 1, W_y = 1 / R."""
        init_projections_((self.in_proj,), self.out_proj, self.d_model, num_blocks)
        for module in (self.B_norm, self.C_norm, self.norm):
            module.reset_parameters()
        init_decay_(self.dt_bias, self.A_log, self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range)
        with torch.no_grad():
            self.D.fill_(1.0)
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
            if self.mimo_x is not None:
                self.mimo_x.fill_(1.0)
                self.mimo_y.fill_(1.0 / self.mimo_rank)

    def forward(self, x: torch.Tensor, state: tuple | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        if x.ndim != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"x: expected shape (B, T >= 1, {self.d_model}), got {tuple(x.shape)}")
        batch, T, _ = x.shape
        H, P, R, N = self.num_heads, self.head_dim, self.mimo_rank, self.d_state
        z, xs, B, C, dt_raw, lam_raw, theta = self.in_proj(x).split(self.split_sizes, dim=-1)
        B = self.B_norm(B.reshape(batch, T, 1, R, N)) + self.B_bias  # (batch, T, H, R, N)
        C = self.C_norm(C.reshape(batch, T, 1, R, N)) + self.C_bias
        dt = F.softplus(dt_raw + self.dt_bias)
        # theta in dt's dtype (float32 under autocast): its per-head gradient is summed over the heads in float32,
        # with no 16-bit cast of the (B, T, H, N / 2) gradient before that sum
        theta = theta.to(dt.dtype)[:, :, None, :].expand(batch, T, H, N // 2)
        xs = xs.reshape(batch, T, H, 1, P)
        xs = xs * self.mimo_x if self.mimo_x is not None else xs
        y, state = mamba3(xs, dt, -torch.exp(self.A_log), torch.sigmoid(lam_raw), B, C, theta, self.D, state,
                          chunk_size=self.chunk_size, document_starts=document_starts)
        y = (y * self.mimo_y).sum(dim=3) if self.mimo_y is not None else y.squeeze(3)  # a view, unlike select
        # RMSNorm(y * silu(z)) as one pass each way on CUDA, as Mamba-2's (the norm module holds weight and eps)
        y = gated_head_norm(y.reshape(batch, T, 1, self.d_inner), z, self.norm.weight, self.norm.bias, self.norm.eps,
                            kind="rms", gate="silu", gate_before_norm=True)
        return self.out_proj(y), state


@dataclass(frozen=True)
class Mamba3Options(LayerOptions):
    """Options of letter 3 (`layer_options["3"]`); None: derived from the model (see `derive`)."""

    d_state: int = 64
    expand: int = 2
    head_dim: int | None = None  # expand * d_model / num_heads (so the model's num_heads counts the heads)
    mimo_rank: int = 1
    chunk_size: int | None = None  # chunk_size
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    bias: bool | None = None  # use_bias

    derive = Mamba2Options.derive  # head_dim from expand and the model's heads, its chunk_size and use_bias


LAYER_KINDS = (LayerKind(letter="3", name="Mamba-3 block", layer=Mamba3, options=Mamba3Options, norm="rms",
                         ffn="swiglu", preset="mamba3", bench_heads={"125m": 24, "1.3b": 32},
                         bench_tiny_options={"d_state": 16}),)
