"""The mLSTM layer's channel-major input maps (revival.ops.mlstm.projections) against their token-major references
in float64: values and gradients."""

from __future__ import annotations

import pytest
import torch

from revival.ops.mlstm.projections import (
    gates_from_inputs,
    gates_reference,
    heads_channel_major,
    headwise_linear,
    headwise_linear_reference,
)

F64 = torch.float64


def _grads(outputs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in outputs)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("with_bias", [True, False])
def test_headwise_linear_feature_major_matches_the_einsum(with_bias):
    g = torch.Generator().manual_seed(0)
    B, T, blocks, bs = 2, 7, 3, 4
    x = torch.randn(B, T, blocks * bs, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(blocks, bs, bs, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(blocks * bs, generator=g, dtype=F64, requires_grad=True) if with_bias else None
    leaves = [t for t in (x, weight, bias) if t is not None]
    x_cm = x.reshape(B * T, -1).t()  # (dim, B T), the layer's layout
    got = headwise_linear(x_cm, weight, bias).t().reshape(B, T, -1)
    ref = headwise_linear_reference(x, weight, bias)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads([got], leaves, 1), _grads([ref], leaves, 1)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gates_from_conv_act_and_x_m_match_the_gates_of_cat_qkv(with_bias):
    """[igate; fgate] composed with the headwise q/k/v maps equals linear(cat(q, k, v)), gradients included."""
    g = torch.Generator().manual_seed(2)
    B, T, H, blocks, bs = 2, 5, 2, 4, 3
    inner = blocks * bs
    rand = lambda *s: torch.randn(*s, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    conv_act, x_m = rand(B, T, inner), rand(B, T, inner)
    maps = [(rand(blocks, bs, bs), rand(inner) if with_bias else None) for _ in range(3)]
    gate_weight, gate_bias = rand(2 * H, 3 * inner), rand(2 * H)
    leaves = [conv_act, x_m, gate_weight, gate_bias] + [t for pair in maps for t in pair if t is not None]
    to_cm = lambda t: t.reshape(B * T, -1).t()  # noqa: E731
    got = gates_from_inputs(gate_weight, gate_bias, *maps, to_cm(conv_act), to_cm(x_m)).t().reshape(B, T, 2 * H)
    q, k = (headwise_linear_reference(conv_act, *maps[i]) for i in (0, 1))
    v = headwise_linear_reference(x_m, *maps[2])
    ref = gates_reference(gate_weight, gate_bias, q, k, v)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads([got], leaves, 3), _grads([ref], leaves, 3)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_heads_channel_major_is_the_per_head_view():
    B, T, H, hd = 2, 3, 4, 5
    x = torch.randn(B, T, H * hd, dtype=F64)
    heads = heads_channel_major(x.reshape(B * T, -1).t(), H, B, T)
    assert heads.shape == (B, H, T, hd)
    torch.testing.assert_close(heads, x.view(B, T, H, hd).transpose(1, 2), rtol=0, atol=0)
