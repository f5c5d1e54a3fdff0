"""CausalConv1d.forward_blocks (one conv per channel block, each output contiguous) against forward on the
concatenation, float64: values, new state and gradients, with a carried state, document starts and one-step calls."""

from __future__ import annotations

import pytest
import torch

from revival.layers.conv import CausalConv1d


@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_starts", [False, True])
def test_blocks_equal_the_split_of_one_conv(T, with_state, with_starts):
    sizes, K, B = [5, 2, 3], 4, 2
    torch.manual_seed(0)
    conv = CausalConv1d(sum(sizes), K, bias=True, activation="silu").double()
    torch.nn.init.normal_(conv.bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, sum(sizes), dtype=torch.float64, generator=gen, requires_grad=True)
    state = (torch.randn(B, K - 1, sum(sizes), dtype=torch.float64, generator=gen, requires_grad=True)
             if with_state else None)
    starts = None
    if with_starts:
        starts = torch.zeros(B, T, dtype=torch.bool)
        starts[0, T // 2] = True
    blocks, new_state = conv.forward_blocks(list(x.split(sizes, dim=-1)), state, starts)
    y_ref, state_ref = conv(x, state, starts)
    for block, ref in zip(blocks, y_ref.split(sizes, dim=-1)):
        assert block.is_contiguous() or T == 1
        # float64 rounding: the CPU conv may order a tap's sums differently by channel count (1 ulp on an AMD EPYC)
        torch.testing.assert_close(block, ref, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(new_state, state_ref, rtol=0, atol=0)

    grad_y = torch.randn(B, T, sum(sizes), dtype=torch.float64, generator=gen)
    grad_s = torch.randn(B, K - 1, sum(sizes), dtype=torch.float64, generator=gen)
    leaves = [x, conv.weight, conv.bias] + ([state] if with_state else [])
    got = torch.autograd.grad((torch.cat(blocks, -1) * grad_y).sum() + (new_state * grad_s).sum(), leaves)
    want = torch.autograd.grad((y_ref * grad_y).sum() + (state_ref * grad_s).sum(), leaves)
    for g, g_ref in zip(got, want):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_blocks_must_cover_the_channels():
    conv = CausalConv1d(6, 4)
    with pytest.raises(ValueError, match="blocks: expected channel blocks summing to dim = 6"):
        conv.forward_blocks([torch.zeros(1, 3, 4)])
