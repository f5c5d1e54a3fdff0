"""The sLSTM layer's headwise gate maps (`revival.ops.slstm.gates`: bmm's, hand-written backward) against the einsum
reference in float64."""

from __future__ import annotations

import pytest
import torch

from revival.ops.slstm.gates import headwise_gates, headwise_gates_reference

F64 = torch.float64


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B, T, H, d", [(2, 5, 3, 4), (1, 1, 1, 2), (3, 7, 2, 1)])
def test_forward_and_gradients_match_einsum_float64(with_bias, B, T, H, d):
    g = torch.Generator().manual_seed(B * 10 + T)
    conv_act = torch.randn(B, T, H * d, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(B, T, H * d, dtype=F64, generator=g, requires_grad=True)
    weight = torch.randn(4, H, d, d, dtype=F64, generator=g, requires_grad=True)
    bias = torch.randn(4, H, d, dtype=F64, generator=g, requires_grad=True) if with_bias else None
    got = headwise_gates(conv_act, x, weight, bias)
    want = headwise_gates_reference(conv_act, x, weight, bias)
    assert got.shape == (B, T, 4, H, d)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(got.shape, dtype=F64, generator=g)
    leaves = [conv_act, x, weight] + ([bias] if with_bias else [])
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradcheck_and_partial_gradients():
    g = torch.Generator().manual_seed(3)
    conv_act, x = (torch.randn(2, 3, 4, dtype=F64, generator=g, requires_grad=True) for _ in range(2))
    weight = torch.randn(4, 2, 2, 2, dtype=F64, generator=g, requires_grad=True)
    bias = torch.randn(4, 2, 2, dtype=F64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(headwise_gates, (conv_act, x, weight, bias))
    frozen = weight.detach()
    (gx,) = torch.autograd.grad(headwise_gates(conv_act.detach(), x, frozen, None).sum(), [x])
    want = headwise_gates_reference(conv_act.detach(), x, frozen, None)
    torch.testing.assert_close(gx, torch.autograd.grad(want.sum(), [x])[0])
