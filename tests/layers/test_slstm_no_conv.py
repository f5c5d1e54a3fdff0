"""The sLSTM layer without a conv (conv_kernel=0): the i and f gates read x itself, as in the official xlstm package
(`x_conv = x` in its sLSTMLayer); `silu_without_conv=True` keeps revival's earlier SiLU(x) for old checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.layers.slstm_layer import SLSTMLayer
from revival.ops.slstm import slstm

F64 = torch.float64


def _layer(silu_without_conv: bool) -> SLSTMLayer:
    torch.manual_seed(0)
    layer = SLSTMLayer(8, num_heads=2, conv_kernel=0, silu_without_conv=silu_without_conv).to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def _by_hand(layer: SLSTMLayer, x: torch.Tensor, gate_source: torch.Tensor, cell_state) -> torch.Tensor:
    B, T, _ = x.shape
    gates = torch.stack([layer.igate(gate_source), layer.fgate(gate_source), layer.zgate(x), layer.ogate(x)], dim=2)
    gates = gates.view(B, T, 4, layer.num_heads, layer.head_dim) + layer.gate_bias
    y, _ = slstm(gates, layer.recurrent_weight, cell_state, impl="reference")
    return layer.group_norm(y)


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("silu_without_conv", [False, True])
def test_gates_read_x_without_a_conv(T, silu_without_conv):
    layer = _layer(silu_without_conv)
    generator = torch.Generator().manual_seed(T)
    prefix, x = (torch.randn(2, n, 8, dtype=F64, generator=generator) for n in (3, T))
    with torch.no_grad():
        _, state = layer(prefix)  # a non-zero cell state (from zeros, a single step does not depend on i and f)
        y, (conv_state, _) = layer(x, state)
        expected = _by_hand(layer, x, F.silu(x) if silu_without_conv else x, state[1])
        other = _by_hand(layer, x, x if silu_without_conv else F.silu(x), state[1])
    assert conv_state.shape == (2, 0, 8)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert (y - other).abs().max() > 1e-3  # the two conventions differ on these weights
