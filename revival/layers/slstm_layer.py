"""The xLSTM paper's sLSTM layer (inside the "post up-projection" block; the block adds the gated MLP).

Data flow for x: (B, T, D), H heads of head_dim d = D / H:

    conv_act  = SiLU(conv(x))                                       # causal depthwise conv, carried state
                                                                    # conv_kernel=0: conv_act = x (official xlstm)
    i, f      = igate(conv_act), fgate(conv_act)                    # headwise (block-diagonal, one block per head)
    z, o      = zgate(x), ogate(x)
    y         = slstm(stack(i, f, z, o) + gate_bias, recurrent_weight)  # revival.ops.slstm, memory mixing per head
    out       = group_norm(y)                                       # per-head layer norm, (B, T, D)

Init (the paper's reference): recurrent weights 0, gate biases 0 except the forget gate's "powerlaw_blockdependent"
bias b_f[u] = 5 - 12 (u / (d - 1)) ** (0.3 + 1.3 * block_index / (num_blocks - 1)) for unit u of every head (from +5
down to -7), gate projections small init. Our gates carry their true names (the reference layer swaps igate/fgate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.slstm import IMPLS, slstm, slstm_step
from ..ops.slstm.gates import headwise_gates
from ._inputs import check_mixer_input, unpack_state
from .conv import CausalConv1d
from .kinds import LayerKind, LayerOptions
from .mlstm_layer import HeadwiseLinear
from .norms import MultiHeadNorm

__all__ = ["SLSTMLayer", "powerlaw_forget_bias"]


def powerlaw_forget_bias(head_dim: int, block_index: int = 0, num_blocks: int = 1) -> torch.Tensor:
    """Forget-gate bias per unit (head_dim,): 5 - 12 (u / (head_dim - 1)) ** (0.3 + 1.3 * block ratio)."""
    ratio = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
    units = torch.arange(head_dim, dtype=torch.float64) / max(head_dim - 1, 1)
    return -(-5.0 + 12.0 * units ** (0.3 + 1.3 * ratio))


class SLSTMLayer(nn.Module):
    """sLSTM mixer of the paper's post-up-projection block (no residual, no outer pre-norm, no MLP).

    forward(x: (B, T, D), state=None) -> (y: (B, T, D), state) with
    state = (conv_state (B, conv_kernel - 1, D), (c, n, m, y) each (B, H, d)); the cell state is float32 (float64 for
    float64 inputs). conv_kernel=0 means no conv: i, f read x itself, as in the official xlstm package
    (`silu_without_conv=True`: SiLU(x), what revival did before config version 2). `bias` toggles the gate biases
    (the cell's bias, where the forget init lives); the projections themselves have none, as in the paper. A single
    token (T == 1) takes the one-step op.
    """

    def __init__(self, d_model: int, num_heads: int = 4, conv_kernel: int = 4, impl: str = "auto", bias: bool = True,
                 silu_without_conv: bool = False):
        super().__init__()
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of d_model={d_model}, got {num_heads}")
        if conv_kernel < 0:
            raise ValueError(f"conv_kernel: expected >= 0 (0 = no conv), got {conv_kernel}")
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.conv_kernel, self.impl, self.silu_without_conv = conv_kernel, impl, silu_without_conv
        self.conv = CausalConv1d(d_model, conv_kernel, bias=True, activation="silu") if conv_kernel > 0 else None
        self.igate = HeadwiseLinear(d_model, self.head_dim)
        self.fgate = HeadwiseLinear(d_model, self.head_dim)
        self.zgate = HeadwiseLinear(d_model, self.head_dim)
        self.ogate = HeadwiseLinear(d_model, self.head_dim)
        self.recurrent_weight = nn.Parameter(torch.empty(4, num_heads, self.head_dim, self.head_dim))
        self.gate_bias = nn.Parameter(torch.empty(4, num_heads, self.head_dim)) if bias else None
        self.group_norm = MultiHeadNorm(num_heads, self.head_dim, eps=1e-5, kind="layer")
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Gate projections small init (width D), recurrent weights 0, biases 0 except the power-law forget bias
        (depends on this block's position `block_index` among `num_blocks`)."""
        for gate in (self.igate, self.fgate, self.zgate, self.ogate):
            gate.reset_parameters(init_dim=self.d_model)
        if self.conv is not None:
            self.conv.reset_parameters()
        nn.init.zeros_(self.recurrent_weight)
        if self.gate_bias is not None:
            with torch.no_grad():
                self.gate_bias.zero_()
                forget = powerlaw_forget_bias(self.head_dim, block_index, num_blocks)
                self.gate_bias[1].copy_(forget.to(self.gate_bias.dtype).expand(self.num_heads, -1))
        self.group_norm.reset_parameters()

    def forward(self, x: torch.Tensor, state=None, document_starts: torch.Tensor | None = None):
        """document_starts (B, T) bool or None: conv window and cell state restart at each document."""
        document_starts = check_mixer_input(x, self.d_model, document_starts)
        conv_state, cell_state = unpack_state(state, ("conv_state", "(c, n, m, y)"), document_starts)
        B, T, D = x.shape
        if self.conv is None:
            conv_act = F.silu(x) if self.silu_without_conv else x
            conv_state = x.new_zeros(B, 0, D)
        else:
            conv_act, conv_state = self.conv(x, conv_state, document_starts)  # SiLU(conv(x))
        H, d = self.num_heads, self.head_dim
        if T == 1:  # one token (decoding): per head, the stacked (2d, d) maps of (i, f) and of (z, o) as two matmuls
            weight_if = torch.stack([self.igate.weight, self.fgate.weight], dim=1).view(H, 2 * d, d)
            weight_zo = torch.stack([self.zgate.weight, self.ogate.weight], dim=1).view(H, 2 * d, d)
            sources = (conv_act.view(B, H, d, 1), x.view(B, H, d, 1))
            gates = torch.cat([weight_if @ sources[0], weight_zo @ sources[1]], dim=2).view(B, H, 4, d)
            if self.gate_bias is not None:
                gates = gates + self.gate_bias.transpose(0, 1)
            y, cell_state = slstm_step(gates.transpose(1, 2), self.recurrent_weight, cell_state)
            y = y[:, None]
        else:  # the four headwise gate maps in one Function laid out for the op (revival.ops.slstm.gates)
            weight = torch.stack([gate.weight for gate in (self.igate, self.fgate, self.zgate, self.ogate)])
            bias = None if self.gate_bias is None else self.gate_bias.to(x.dtype)
            gates = headwise_gates(conv_act.to(x.dtype), x, weight.to(x.dtype), bias)  # (B, T, 4, H, d)
            y, cell_state = slstm(gates, self.recurrent_weight, cell_state, impl=self.impl,
                                  document_starts=document_starts)
        return self.group_norm(y), (conv_state, cell_state)


@dataclass(frozen=True)
class SLSTMOptions(LayerOptions):
    """Options of letter s (`layer_options["s"]`); None: the ModelConfig field in the comment."""

    num_heads: int | None = None  # slstm_num_heads, or num_heads when that is None
    conv_kernel: int | None = None  # slstm_conv_kernel
    impl: str | None = None  # slstm_impl
    bias: bool = True  # the gate biases (the forget-gate init lives there); not use_bias, which is for projections
    silu_without_conv: bool = False  # conv_kernel=0: i, f read SiLU(x) instead of x (revival's configs before v2)

    def derive(self, config):
        heads = config.slstm_num_heads if config.slstm_num_heads is not None else config.num_heads
        return dict(num_heads=heads, conv_kernel=config.slstm_conv_kernel, impl=config.slstm_impl)


LAYER_KINDS = (LayerKind(letter="s", name="paper sLSTM block", layer=SLSTMLayer, options=SLSTMOptions, norm="layer",
                         ffn="gated_mlp", bench_heads={"125m": 4, "1.3b": 4}),)
