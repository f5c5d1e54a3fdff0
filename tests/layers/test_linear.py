"""linear_many: the concatenated product equals the layers run one by one (values and gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revival.layers import linear as linear_module
from revival.layers.linear import linear_concat, linear_many


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [3, 300])  # below and above FUSE_MIN_ROWS
def test_matches_separate_layers(bias, rows):
    torch.manual_seed(0)
    layers = [nn.Linear(16, n, bias=bias).double() for n in (8, 8, 24)]
    x = torch.randn(rows, 16, dtype=torch.float64, requires_grad=True)
    outs = linear_many(x, layers)
    assert [o.shape[-1] for o in outs] == [8, 8, 24]
    sum((o * (k + 1)).sum() for k, o in enumerate(outs)).backward()
    fused_grads = [x.grad] + [p.grad for layer in layers for p in layer.parameters()]
    x.grad = None
    for layer in layers:
        layer.zero_grad()
    separate = [layer(x) for layer in layers]
    sum((o * (k + 1)).sum() for k, o in enumerate(separate)).backward()
    separate_grads = [x.grad] + [p.grad for layer in layers for p in layer.parameters()]
    for a, b in zip(outs, separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, separate_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert rows < linear_module.FUSE_MIN_ROWS or outs[0]._base is not None  # one product, outputs are its views


def test_mixed_biases_rejected():
    x = torch.randn(300, 4)
    with pytest.raises(ValueError, match="all layers with a bias or all without"):
        linear_many(x, [nn.Linear(4, 2), nn.Linear(4, 2, bias=False)])


@pytest.mark.parametrize("bias", [False, True])
def test_inference_writes_each_product_into_one_output(bias):
    """Without autograd, the layers' products go into column blocks of one output (no weight concatenated); the
    values equal the layers run one by one, and the outputs are views of one tensor."""
    torch.manual_seed(0)
    layers = [nn.Linear(16, n, bias=bias).double() for n in (8, 24)]
    x = torch.randn(2, 150, 16, dtype=torch.float64)
    with torch.no_grad():
        packed = linear_concat(x, layers)
        outs = linear_many(x, layers)
        separate = [layer(x) for layer in layers]
    assert packed.shape == (2, 150, 32) and packed.is_contiguous()
    torch.testing.assert_close(packed, torch.cat(separate, dim=-1), rtol=1e-12, atol=1e-12)
    for a, b in zip(outs, separate):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert outs[0]._base is not None and outs[0]._base is outs[1]._base
