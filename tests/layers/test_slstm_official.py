"""The sLSTM layer against the official xlstm package's `sLSTMLayer` (vanilla backend) with the same weights, with and
without a conv. Runs where `xlstm` (2.0.6) is installed (`pip install --no-deps xlstm==2.0.6` is enough for this layer);
it is not a dependency, so CI skips it. With conv_kernel=0 it failed before config version 2 (revival fed SiLU(x))."""

from __future__ import annotations

import pytest
import torch

from revival.layers.slstm_layer import SLSTMLayer

xlstm_slstm = pytest.importorskip("xlstm.blocks.slstm.layer", reason="the official `xlstm` package is not installed")

D, HEADS = 16, 2


def official_and_revival(conv_kernel: int):
    torch.manual_seed(0)
    config = xlstm_slstm.sLSTMLayerConfig(embedding_dim=D, num_heads=HEADS, conv1d_kernel_size=conv_kernel,
                                          backend="vanilla", dropout=0.0)
    official = xlstm_slstm.sLSTMLayer(config).double().eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = SLSTMLayer(D, num_heads=HEADS, conv_kernel=conv_kernel).double().eval()
    cell = official.slstm_cell
    with torch.no_grad():
        ours.igate.weight.copy_(official.fgate.weight)  # the official layer computes its input gate with `fgate`
        ours.fgate.weight.copy_(official.igate.weight)
        ours.zgate.weight.copy_(official.zgate.weight)
        ours.ogate.weight.copy_(official.ogate.weight)
        # external layouts: recurrent kernel (H, d_in, 4, d_out), bias (H, 4, d); revival (4, H, d_in, d_out), (4, H, d)
        ours.recurrent_weight.copy_(cell._recurrent_kernel_int2ext(cell._recurrent_kernel_).permute(2, 0, 1, 3))
        ours.gate_bias.copy_(cell._bias_int2ext(cell._bias_).permute(1, 0, 2))
        ours.group_norm.weight.copy_(1.0 + official.group_norm.weight)  # its norm weight is stored as w - 1
        if conv_kernel:
            ours.conv.weight.copy_(official.conv1d.conv.weight.view_as(ours.conv.weight))
            ours.conv.bias.copy_(official.conv1d.conv.bias)
    return official, ours


@pytest.mark.parametrize("conv_kernel", [0, 4])
def test_matches_the_official_layer(conv_kernel):
    official, ours = official_and_revival(conv_kernel)
    x = torch.randn(2, 11, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official(x)
        y, _ = ours(x)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
