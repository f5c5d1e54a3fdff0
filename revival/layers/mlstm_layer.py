"""The xLSTM paper's mLSTM layer (inside the "pre up-projection" block), and the block-diagonal headwise projection.

Data flow for x: (B, T, D), inner = round_up(proj_factor * D, 64), H heads of head_dim = inner / H:

    x_m, z     = split(proj_up(x))                        # (B, T, inner) each
    conv_act   = SiLU(conv(x_m))                          # causal depthwise conv, kernel conv_kernel, carried state
    q, k, v    = q_proj(conv_act), k_proj(conv_act), v_proj(x_m)      # headwise: blocks of qkv_block_size
    i, f       = igate(cat(q, k, v)), fgate(cat(q, k, v)) # (B, T, H) pre-activations, computed in float32
    h          = mlstm(q, k, v, i, f)                     # revival.ops.mlstm, per head
    y          = proj_down((group_norm(h) + learnable_skip * conv_act) * SiLU(z))

The skip adds the conv output after its SiLU, as the paper's reference layer does (docs/math.md, "The xLSTM blocks").

CPU speed (docs/kernels.md, "CPU training step"): x_m, conv_act, q, k, v and the gates live channel-major,
(inner, B T): the depthwise conv runs on that memory through a (B, T, inner) view, a block-diagonal map is one batch
of (bs, bs) @ (bs, B T) products, and the gates use [igate; fgate] composed with the headwise maps, so cat(q, k, v)
is never built. One token (decoding) takes the plain per-token maps (`_step`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.mlstm import IMPLS, PRECISIONS, mlstm, mlstm_step
from ..ops.mlstm.projections import gates_from_inputs, heads_channel_major, headwise_linear
from ._inputs import check_mixer_input, unpack_state
from .conv import CausalConv1d
from .ffn import round_up, small_init_, wang_init_
from .kinds import LayerKind, LayerOptions
from .norms import MultiHeadNorm

__all__ = ["MLSTMLayer", "HeadwiseLinear"]


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: the features split into blocks of `block_size`, each with its own square matrix.

    weight: (num_blocks, block_size, block_size) with out = weight[b] @ in for block b; x: (..., dim) -> (..., dim).
    """

    def __init__(self, dim: int, block_size: int, bias: bool = False):
        super().__init__()
        if block_size < 1 or dim % block_size:
            raise ValueError(f"block_size: expected a positive divisor of dim={dim}, got {block_size}")
        self.dim, self.block_size, self.num_blocks = dim, block_size, dim // block_size
        self.weight = nn.Parameter(torch.empty(self.num_blocks, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, init_dim: int | None = None) -> None:
        """Small init N(0, 2 / (5 init_dim)) (init_dim defaults to dim), zero bias."""
        small_init_(self.weight, self.dim if init_dim is None else init_dim)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim), through the feature-major form (the result is a transposed view)."""
        if x.ndim == 1:
            return self.forward(x[None])[0]
        return self.forward_feature_major(x.transpose(-1, -2)).transpose(-1, -2)

    def forward_feature_major(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim, T) -> (..., dim, T). In this layout each block is a (bs, bs) @ (bs, T) product: one batched
        matmul with long rows, several times faster on CPU than the same map on (..., T, dim) data."""
        return headwise_linear(x, self.weight, self.bias)


class MLSTMLayer(nn.Module):
    """mLSTM mixer of the paper's pre-up-projection block (no residual, no outer pre-norm).

    forward(x: (B, T, D), state=None) -> (y: (B, T, D), state) with
    state = (conv_state (B, conv_kernel - 1, inner), (C (B, H, hd, hd), n (B, H, hd), m (B, H))); the mLSTM state is
    float32 (float64 for float64 inputs). A single token (T == 1) takes the one-step op.
    """

    def __init__(self, d_model: int, num_heads: int = 4, proj_factor: float = 2.0, conv_kernel: int = 4,
                 qkv_block_size: int = 4, chunk_size: int = 64, impl: str = "auto", bias: bool = False,
                 precision: str = "auto"):
        super().__init__()
        inner = round_up(proj_factor * d_model, 64)
        if num_heads < 1 or inner % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of the inner width {inner}, got {num_heads}")
        if qkv_block_size < 1 or inner % qkv_block_size:
            raise ValueError(f"qkv_block_size: expected a positive divisor of the inner width {inner}, "
                             f"got {qkv_block_size}")
        if conv_kernel < 1:
            raise ValueError(f"conv_kernel: expected >= 1, got {conv_kernel}")
        if chunk_size < 8 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two >= 8, got {chunk_size}")
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        self.precision = precision  # the Triton kernels' precision preset for 16-bit inputs (revival.ops.mlstm)
        self.d_model, self.inner_dim, self.num_heads = d_model, inner, num_heads
        self.head_dim = inner // num_heads
        self.chunk_size, self.impl = chunk_size, impl
        self.proj_up = nn.Linear(d_model, 2 * inner, bias=bias)
        self.conv = CausalConv1d(inner, conv_kernel, bias=True, activation="silu")
        self.q_proj = HeadwiseLinear(inner, qkv_block_size, bias=bias)
        self.k_proj = HeadwiseLinear(inner, qkv_block_size, bias=bias)
        self.v_proj = HeadwiseLinear(inner, qkv_block_size, bias=bias)
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm = MultiHeadNorm(num_heads, self.head_dim, eps=1e-5, kind="layer", bias=bias)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """The paper's init: small init (width D) for proj_up and q/k/v, Wang init (depth `num_blocks`) for proj_down,
        gate weights 0, forget bias linspace(3, 6) over heads, input bias ~ N(0, 0.1), skip 1, other biases 0."""
        small_init_(self.proj_up.weight, self.d_model)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.reset_parameters(init_dim=self.d_model)
        wang_init_(self.proj_down.weight, self.d_model, num_blocks)
        for linear in (self.proj_up, self.proj_down):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.conv.reset_parameters()
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        self.outnorm.reset_parameters()
        nn.init.ones_(self.learnable_skip)

    def _gate_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[igate; fgate] weight (2H, 3 inner) and bias (2H,) in the gates' dtype: float32 (float64 for float64)."""
        gate_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return (torch.cat([self.igate.weight, self.fgate.weight]).to(gate_dtype),
                torch.cat([self.igate.bias, self.fgate.bias]).to(gate_dtype))

    def _gates_from_inputs(self, gate_weight, gate_bias, conv_cm, x_m_cm):
        """[igate; fgate] @ cat(q, k, v) without building cat(q, k, v) (revival.ops.mlstm.projections); conv_cm,
        x_m_cm: (inner, B T). Returns (2H, B T)."""
        maps = [(proj.weight, proj.bias) for proj in (self.q_proj, self.k_proj, self.v_proj)]
        return gates_from_inputs(gate_weight, gate_bias, *maps, conv_cm, x_m_cm)

    def forward(self, x: torch.Tensor, state=None, document_starts: torch.Tensor | None = None):
        """document_starts (B, T) bool or None: conv window and cell state restart at each document
        (revival/ops/_documents.py)."""
        document_starts = check_mixer_input(x, self.d_model, document_starts)
        conv_state, cell_state = unpack_state(state, ("conv_state", "(C, n, m)"), document_starts)
        B, T, _ = x.shape
        if T == 1:
            return self._step(x, conv_state, cell_state)
        H, inner, N = self.num_heads, self.inner_dim, B * T
        # Channel-major layout: x_m comes out of its own matmul as (inner, B T). The conv runs on its (B, T, inner)
        # view (its elementwise ops follow the memory layout), and q/k/v and the gates are each one product over all
        # B T tokens: a block-diagonal map is one batch of (bs, bs) @ (bs, B T) products, and the weight gradients
        # need no sum over a batch dimension. z stays (B, T, inner) for the output.
        w_m, w_z = self.proj_up.weight.split(inner, dim=0)
        x_m_cm = torch.mm(w_m, x.reshape(N, -1).t())  # (inner, B T), contiguous
        z = F.linear(x, w_z)
        if self.proj_up.bias is not None:
            b_m, b_z = self.proj_up.bias.split(inner)
            x_m_cm, z = x_m_cm + b_m[:, None], z + b_z
        conv_act, conv_state = self.conv(x_m_cm.view(inner, B, T).permute(1, 2, 0), conv_state,
                                         document_starts)  # SiLU(conv)
        # conv_act: (B, T, inner) view of (inner, B, T) memory
        conv_cm = conv_act.permute(2, 0, 1).reshape(inner, N)  # no copy: already in this layout
        q, k, v = (self.q_proj.forward_feature_major(conv_cm), self.k_proj.forward_feature_major(conv_cm),
                   self.v_proj.forward_feature_major(x_m_cm))  # (inner, B T) each
        with torch.autocast(device_type=x.device.type, enabled=False):  # gate pre-activations stay in float32
            gates = self._gates_from_inputs(*self._gate_parameters(x.dtype), conv_cm, x_m_cm)
        i, f = (g.view(H, B, T).transpose(0, 1) for g in gates.split(H))  # (B, H, T) views

        def heads(t: torch.Tensor) -> torch.Tensor:  # (inner, B T) -> (B, H, T, hd) as a view: the op copies it
            return heads_channel_major(t, H, B, T)

        h, cell_state = mlstm(heads(q), heads(k), heads(v), i, f, cell_state, impl=self.impl,
                              chunk_size=self.chunk_size, precision=self.precision, document_starts=document_starts)
        return self._output(h.transpose(1, 2), conv_act, z), (conv_state, cell_state)

    def _output(self, h: torch.Tensor, conv_act: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """proj_down((group_norm(h) + skip * conv_act) * SiLU(z)); h (B, T, H, hd), conv_act and z (B, T, inner)."""
        h = torch.addcmul(self.outnorm(h), conv_act, self.learnable_skip)
        return self.proj_down(h * F.silu(z))

    def _step(self, x: torch.Tensor, conv_state, cell_state):
        """One token (decoding): one matmul for x_m and z, the plain maps of cat(q, k, v); (B, 1, D) in and out."""
        x_m, z = self.proj_up(x).split(self.inner_dim, dim=-1)
        conv_act, conv_state = self.conv(x_m, conv_state)
        q, k, v = self.q_proj(conv_act[:, 0]), self.k_proj(conv_act[:, 0]), self.v_proj(x_m[:, 0])  # (B, inner)
        with torch.autocast(device_type=x.device.type, enabled=False):
            gate_weight, gate_bias = self._gate_parameters(x.dtype)
            gates = F.linear(torch.cat([q, k, v], dim=-1).to(gate_weight.dtype), gate_weight, gate_bias)  # (B, 2H)
        i, f = gates.split(self.num_heads, dim=-1)
        heads = (t.view(-1, self.num_heads, self.head_dim) for t in (q, k, v))
        h, cell_state = mlstm_step(*heads, i, f, cell_state)
        return self._output(h[:, None], conv_act, z), (conv_state, cell_state)


@dataclass(frozen=True)
class MLSTMOptions(LayerOptions):
    """Options of letter m (`layer_options["m"]`); None: the ModelConfig field in the comment."""

    num_heads: int | None = None  # num_heads
    proj_factor: float | None = None  # mlstm_proj_factor
    conv_kernel: int | None = None  # mlstm_conv_kernel
    qkv_block_size: int | None = None  # mlstm_qkv_block_size
    chunk_size: int | None = None  # chunk_size
    impl: str | None = None  # mlstm_impl
    bias: bool | None = None  # use_bias
    precision: str | None = None  # mlstm_precision

    def derive(self, config):
        return dict(num_heads=config.num_heads, proj_factor=config.mlstm_proj_factor,
                    conv_kernel=config.mlstm_conv_kernel, qkv_block_size=config.mlstm_qkv_block_size,
                    chunk_size=config.chunk_size, impl=config.mlstm_impl, bias=config.use_bias,
                    precision=config.mlstm_precision)


LAYER_KINDS = (LayerKind(letter="m", name="paper mLSTM block", layer=MLSTMLayer, options=MLSTMOptions, norm="layer",
                         ffn=None, bench_heads={"125m": 4, "1.3b": 4}),)
