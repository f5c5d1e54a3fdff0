"""MultiHeadNorm with one head (the weight inside F.rms_norm / F.layer_norm) against the per-head form's formula,
float64 values and gradients, and bf16 inputs computed in float32 and rounded once (exactly the formula's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.layers.norms import MultiHeadNorm


def _formula(x, norm, dtype=torch.float64):
    normalize = F.layer_norm if norm.kind == "layer" else F.rms_norm
    y = normalize(x.to(dtype), (norm.head_dim,), eps=norm.eps).flatten(-2) * norm.weight.to(dtype)
    return y if norm.bias is None else y + norm.bias.to(dtype)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("bias", [False, True])
def test_one_head_matches_the_formula(kind, bias):
    torch.manual_seed(0)
    norm = MultiHeadNorm(1, 12, eps=1e-5, kind=kind, bias=bias).double()
    with torch.no_grad():
        norm.weight.normal_()
        if bias:
            norm.bias.normal_()
    x = torch.randn(2, 5, 1, 12, dtype=torch.float64, requires_grad=True)
    y = norm(x)
    want = _formula(x, norm)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(y)
    leaves = [x, norm.weight] + ([norm.bias] if bias else [])
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("heads", [1, 3])
def test_bfloat16_rounded_once(heads):
    torch.manual_seed(1)
    norm = MultiHeadNorm(heads, 16, eps=1e-5, kind="rms")
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 7, heads, 16).bfloat16()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, _formula(x, norm, torch.float32).bfloat16(), rtol=0, atol=0)
