"""The sLSTM layer's headwise gate maps (`_HeadwiseGates`, hand-written backward) against einsum in float64."""

from __future__ import annotations

import pytest
import torch

from revival.layers.slstm_layer import _HeadwiseGates

F64 = torch.float64


def plain(conv_act, x, weight, bias):
    """gates[b, t, g, h] = src_g[b, t, h] @ weight[g, h]^T (+ bias[g, h]); src = conv_act for i, f and x for z, o."""
    B, T, D = x.shape
    G, H, d, _ = weight.shape
    sources = [conv_act, conv_act, x, x]
    gates = torch.stack([torch.einsum("bthk,hjk->bthj", s.view(B, T, H, d), weight[g]) for g, s in enumerate(sources)],
                        dim=2)
    return gates if bias is None else gates + bias


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B, T, H, d", [(2, 5, 3, 4), (1, 1, 1, 2), (3, 7, 2, 1)])
def test_forward_and_gradients_match_einsum_float64(with_bias, B, T, H, d):
    g = torch.Generator().manual_seed(B * 10 + T)
    conv_act = torch.randn(B, T, H * d, dtype=F64, generator=g, requires_grad=True)
    x = torch.randn(B, T, H * d, dtype=F64, generator=g, requires_grad=True)
    weight = torch.randn(4, H, d, d, dtype=F64, generator=g, requires_grad=True)
    bias = torch.randn(4, H, d, dtype=F64, generator=g, requires_grad=True) if with_bias else None
    got = _HeadwiseGates.apply(conv_act, x, weight, bias)
    want = plain(conv_act, x, weight, bias)
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
    assert torch.autograd.gradcheck(_HeadwiseGates.apply, (conv_act, x, weight, bias))
    frozen = weight.detach()
    (gx,) = torch.autograd.grad(_HeadwiseGates.apply(conv_act.detach(), x, frozen, None).sum(), [x])
    torch.testing.assert_close(gx, torch.autograd.grad(plain(conv_act.detach(), x, frozen, None).sum(), [x])[0])
