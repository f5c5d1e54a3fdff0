"""Mamba-2 mixer layer (arXiv 2405.21060): in-projection, causal conv, SSD, gated RMSNorm, out-projection.

    (z, xBC, dt_raw) = W_in x                     z, x: d_inner = expand * d_model; B, C: n_groups * d_state each;
                                                  dt_raw: one per head (num_heads = d_inner / head_dim)
    xBC = silu(conv(xBC)); (x, B, C) = split(xBC)
    dt = softplus(dt_raw + dt_bias); A = -exp(A_log)
    y = SSD(x, dt, A, B, C, D)                    (revival.ops.ssd, chunkwise)
    y = W_out RMSNorm_groupwise(y * silu(z))      gated norm, normalized per group of d_inner / n_groups channels

The mixer only (no residual, outer norm or MLP). forward(x: (B, T, d_model), state=None) -> (y, state) with
state = (conv_state: (B, conv_kernel - 1, d_inner + 2 * n_groups * d_state),
         ssm_state: (B, num_heads, head_dim, d_state) in float32 (float64 for float64 weights)); constant in T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fused import gated_head_norm
from ..ops.ssd import ssd
from ._inputs import check_mixer_input, unpack_state
from .conv import CausalConv1d
from .ffn import init_projections_
from .kinds import LayerKind, LayerOptions
from .norms import MultiHeadNorm

__all__ = ["DecayInitOptions", "Mamba2", "init_decay_"]


def init_decay_(dt_bias: torch.Tensor, A_log: torch.Tensor, dt_min: float, dt_max: float, dt_init_floor: float,
                A_init_range: tuple[float, float]) -> None:
    """Mamba's decay init: dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] (floored), and
    A_log = log(A) with A uniform in A_init_range."""
    with torch.no_grad():
        dt = torch.exp(torch.rand_like(dt_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(dt_init_floor)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A_log.copy_(torch.log(torch.empty_like(A_log).uniform_(*A_init_range)))


@dataclass(frozen=True)
class DecayInitOptions(LayerOptions):
    """The options of `init_decay_`, shared by the kinds with a Mamba-style dt / A (they come first in their lists)."""

    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)


class Mamba2(nn.Module):
    """Mamba-2 mixer (see the module doc for the equations and the state)."""

    def __init__(self, d_model: int, *, d_state: int = 64, expand: int = 2, head_dim: int = 64, n_groups: int = 1,
                 conv_kernel: int = 4, chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_init_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = 1e-5,
                 bias: bool = False, conv_bias: bool = True):
        super().__init__()
        d_inner = expand * d_model
        if head_dim < 1 or d_inner % head_dim:
            raise ValueError(f"head_dim: expected a divisor of d_inner = expand * d_model = {d_inner}, got {head_dim}")
        num_heads = d_inner // head_dim
        if n_groups < 1 or num_heads % n_groups:
            raise ValueError(f"n_groups: expected a divisor of num_heads = {num_heads}, got {n_groups}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {A_init_range}")
        self.d_model, self.d_inner, self.d_state, self.head_dim = d_model, d_inner, d_state, head_dim
        self.num_heads, self.n_groups, self.chunk_size = num_heads, n_groups, chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range = dt_min, dt_max, dt_init_floor, A_init_range
        self.conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + num_heads, bias=bias)  # [z, x, B, C, dt]
        self.conv = CausalConv1d(self.conv_dim, conv_kernel, bias=conv_bias, activation="silu")
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.D = nn.Parameter(torch.empty(num_heads))
        self.norm = MultiHeadNorm(n_groups, d_inner // n_groups, eps=norm_eps, kind="rms")
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init in, Wang init out, Mamba's dt_bias / A_log (uniform in A_init_range) / D = 1."""
        init_projections_((self.in_proj,), self.out_proj, self.d_model, num_blocks)
        self.conv.reset_parameters()
        self.norm.reset_parameters()
        init_decay_(self.dt_bias, self.A_log, self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range)
        with torch.no_grad():
            self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        document_starts = check_mixer_input(x, self.d_model, document_starts)
        conv_state, ssm_state = unpack_state(state, ("conv_state", "ssm_state"))
        batch, T, _ = x.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.d_state
        z, xs, B, C, dt_raw = self.in_proj(x).split([self.d_inner, self.d_inner, G * N, G * N, H], dim=-1)
        # SiLU(conv(x|B|C)) per block: contiguous x, B, C for the SSD kernels (no copies, no concatenated gradient)
        (xs, B, C), conv_state = self.conv.forward_blocks([xs, B, C], conv_state, document_starts)
        dt = F.softplus(dt_raw + self.dt_bias)
        A = -torch.exp(self.A_log)
        y, ssm_state = ssd(xs.reshape(batch, T, H, P), dt, A, B.reshape(batch, T, G, N), C.reshape(batch, T, G, N),
                           self.D, ssm_state, chunk_size=self.chunk_size, document_starts=document_starts)
        # RMSNorm_groupwise(y * silu(z)) as one pass each way on CUDA (z read in place from the projection): not the
        # silu, product, float32 casts and norm passes of the PyTorch form; the norm module holds weight and eps
        y = gated_head_norm(y.reshape(batch, T, G, self.d_inner // G), z, self.norm.weight, self.norm.bias,
                            self.norm.eps, kind="rms", gate="silu", gate_before_norm=True)
        return self.out_proj(y), (conv_state, ssm_state)


@dataclass(frozen=True)
class Mamba2Options(DecayInitOptions):
    """Options of letter M (`layer_options["M"]`); None: derived from the model (see `derive`)."""

    d_state: int = 128
    expand: int = 2
    head_dim: int | None = None  # expand * d_model / num_heads (so the model's num_heads counts the SSD heads)
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int | None = None  # chunk_size
    norm_eps: float = 1e-5
    bias: bool | None = None  # use_bias
    conv_bias: bool = True

    def derive(self, config):
        return dict(head_dim=self.expand * config.d_model // config.num_heads, chunk_size=config.chunk_size,
                    bias=config.use_bias)


LAYER_KINDS = (LayerKind(letter="M", name="Mamba-2 block", layer=Mamba2, options=Mamba2Options, norm="rms",
                         ffn="swiglu", preset="mamba2", bench_heads={"125m": 24, "1.3b": 32},
                         bench_tiny_options={"d_state": 16}),)
