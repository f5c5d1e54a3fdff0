"""Gated DeltaNet mixer layer (arXiv 2412.06464).

    q, k, v = silu(conv(W_q x, W_k x, W_v x))     short causal depthwise convs (one conv over the concatenation)
    q, k = L2-normalize per head                  head dims: Dk = head_dim, Dv = round(expand_v * head_dim)
    beta = sigmoid(W_b x)                         (B, T, H); 2 sigmoid(W_b x) with allow_neg_eigval (OLMo Hybrid)
    g = -exp(A_log) * softplus(W_a x + dt_bias)   log decay per head, Mamba-style
    o = gated_delta_rule(q, k, v, g, beta)        S_t = a_t (I - beta k k^T) S_{t-1} + beta k v^T, o = S^T q / sqrt(Dk)
    y = W_out (RMSNorm_per_head(o) * silu(W_gate x))

The mixer only (no residual, outer norm or MLP). forward(x: (B, T, d_model), state=None) -> (y, state) with
state = (conv_state: (B, conv_kernel - 1, H * (2 * Dk + Dv)),
         delta_state: (B, H, Dk, Dv) key-major, in float32 (float64 for float64 weights)); constant in T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.delta_rule import gated_delta_rule
from ..ops.fused import gated_head_norm, l2_normalize_heads
from ._inputs import check_mixer_input, unpack_state
from .conv import CausalConv1d
from .ffn import init_projections_
from .kinds import LayerKind
from .linear import linear_concat, linear_many
from .mamba2 import DecayInitOptions, init_decay_
from .norms import MultiHeadNorm

__all__ = ["GatedDeltaNet"]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer (see the module doc for the equations and the state)."""

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, expand_v: float = 2.0,
                 conv_kernel: int = 4, chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, A_init_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = 1e-6,
                 bias: bool = False, conv_bias: bool = False, allow_neg_eigval: bool = False):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads: expected >= 1, got {num_heads}")
        head_dim = d_model // num_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim: expected >= 1 (default d_model // num_heads), got {head_dim}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range: expected 0 < low <= high, got {A_init_range}")
        self.d_model, self.num_heads, self.chunk_size = d_model, num_heads, chunk_size
        self.allow_neg_eigval = allow_neg_eigval
        self.head_k_dim, self.head_v_dim = head_dim, max(1, round(expand_v * head_dim))
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range = dt_min, dt_max, dt_init_floor, A_init_range
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=bias)
        self.gate_proj = nn.Linear(d_model, self.value_dim, bias=bias)
        self.a_proj = nn.Linear(d_model, num_heads, bias=False)
        self.b_proj = nn.Linear(d_model, num_heads, bias=False)
        self.conv = CausalConv1d(2 * self.key_dim + self.value_dim, conv_kernel, bias=conv_bias, activation="silu")
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.norm = MultiHeadNorm(num_heads, self.head_v_dim, eps=norm_eps, kind="rms")
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=bias)
        self.reset_parameters()

    @property
    def _reading(self) -> tuple[nn.Linear, ...]:
        """The projections reading x, in the order of the packed product: q, k, v (the conv's input), gate, a, b."""
        return (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.a_proj, self.b_proj)

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init for the projections reading x, Wang init out, Mamba-style dt_bias, A uniform in A_init_range."""
        init_projections_(self._reading, self.out_proj, self.d_model, num_blocks)
        self.conv.reset_parameters()
        self.norm.reset_parameters()
        init_decay_(self.dt_bias, self.A_log, self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        document_starts = check_mixer_input(x, self.d_model, document_starts)
        conv_state, delta_state = unpack_state(state, ("conv_state", "delta_state"))
        batch, T, _ = x.shape
        H, Dk, Dv = self.num_heads, self.head_k_dim, self.head_v_dim
        # q|k|v|gate as one product (its outputs views of one tensor: no torch.cat), a and b apart: with
        # them the product's row width (2 Dk H + 2 Dv H + 2 H) loses its 16-byte alignment and cuBLAS falls back to
        # sm80 "align2" kernels for its backward (the H200 profile of the 125M step)
        q, k, v, gate = linear_concat(x, self._reading[:4]).split(
            [self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        a, b = linear_many(x, self._reading[4:])
        # SiLU(conv(q|k|v)) per block: a contiguous v for the kernels (no copy), no concatenated dq|dk|dv
        (q, k, v), conv_state = self.conv.forward_blocks([q, k, v], conv_state, document_starts)
        # contiguous q, k in the conv's dtype (16-bit under autocast, as v: the kernels' 16-bit products either way)
        q = l2_normalize_heads(q.reshape(batch, T, H, Dk))
        k = l2_normalize_heads(k.reshape(batch, T, H, Dk))
        beta = torch.sigmoid(b.contiguous())  # (B, T, H), small; CPU sigmoid rounds strided views differently
        if self.allow_neg_eigval:  # beta in (0, 2): I - beta k k^T can reflect (eigenvalue 1 - beta < 0)
            beta = 2 * beta
        g = -torch.exp(self.A_log) * F.softplus(a + self.dt_bias)
        o, delta_state = gated_delta_rule(q, k, v.reshape(batch, T, H, Dv), g, beta, delta_state,
                                          scale=Dk**-0.5, chunk_size=self.chunk_size, document_starts=document_starts)
        y = gated_head_norm(o, gate, self.norm.weight, self.norm.bias, self.norm.eps, kind="rms", gate="silu")
        return self.out_proj(y), (conv_state, delta_state)


@dataclass(frozen=True)
class GatedDeltaNetOptions(DecayInitOptions):
    """Options of letter d (`layer_options["d"]`); None: derived from the model (see `derive`)."""

    num_heads: int | None = None  # num_heads
    head_dim: int | None = None  # None: d_model / num_heads (the layer decides)
    expand_v: float = 2.0
    conv_kernel: int = 4
    chunk_size: int | None = None  # chunk_size
    norm_eps: float = 1e-6
    bias: bool | None = None  # use_bias
    conv_bias: bool = False
    allow_neg_eigval: bool = False  # beta = 2 sigmoid(.) in (0, 2), as OLMo Hybrid

    def derive(self, config):
        return dict(num_heads=config.num_heads, chunk_size=config.chunk_size, bias=config.use_bias)


LAYER_KINDS = (LayerKind(letter="d", name="Gated DeltaNet block", layer=GatedDeltaNet, options=GatedDeltaNetOptions,
                         norm="rms", ffn="swiglu", preset="gated-deltanet", bench_heads={"125m": 6, "1.3b": 16}),)
