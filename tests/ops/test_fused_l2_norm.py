"""l2_normalize_heads: the Triton kernels (under TRITON_INTERPRET=1 on CPU) against F.normalize in float64."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.ops.fused.l2_norm import l2_normalize_heads, l2_normalize_heads_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


def _run(packed, dy, H, D, fn, device):
    """fn on q = the first H * D columns of a packed (B, T, C) tensor viewed (B, T, H, D), as the layer's split view
    of the conv output; returns y and the packed tensor's gradient."""
    leaf = packed.detach().to(device).requires_grad_(True)
    x = leaf[..., : H * D].reshape(*leaf.shape[:-1], H, D)
    y = fn(x)
    y.backward(dy.to(device).to(y.dtype))
    return y.detach(), leaf.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3)])
@pytest.mark.parametrize("B,T,H,D", [(2, 37, 3, 24), (1, 70, 2, 128), (1, 5, 2, 300)])
def test_kernel_matches_float64_on_strided_input(B, T, H, D, dtype, tol):
    g = torch.Generator().manual_seed(B * T + D)
    packed = (torch.randn(B, T, 3 * H * D, generator=g) * 2 + 0.5).to(dtype)  # q|k|v, q a strided view
    dy = torch.randn(B, T, H, D, generator=g).to(dtype)
    y, dpacked = _run(packed, dy, H, D, lambda x: l2_normalize_heads(x, impl="triton"), DEVICE)
    y_ref, dpacked_ref = _run(packed.double(), dy.double(), H, D, lambda x: F.normalize(x, dim=-1), "cpu")
    assert y.dtype == dtype and y.shape == (B, T, H, D) and y.is_contiguous()
    assert dpacked[..., H * D:].abs().max() == 0  # the gradient lands in q's columns only
    errors = {"y": _rel(y, y_ref), "dx": _rel(dpacked[..., : H * D], dpacked_ref[..., : H * D])}
    assert max(errors.values()) < tol, errors


def test_clamp_case_matches_f_normalize():
    """Heads with ||x|| < eps (x = 0, and a tiny one) take F.normalize's values and clamp subgradient dy / eps."""
    eps = 1e-3
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    x[0, 0] = 0.0
    x[1, 1] = 1e-5
    dy = torch.randn(4, 2, 5, dtype=torch.float64)
    y, dx = _run(x.flatten(-2).float(), dy.float(), 2, 5, lambda t: l2_normalize_heads(t, eps, impl="triton"),
                 DEVICE)
    y_ref, dx_ref = _run(x.flatten(-2), dy, 2, 5, lambda t: F.normalize(t, dim=-1, eps=eps), "cpu")
    assert y[0, 0].abs().max() == 0
    torch.testing.assert_close(dx[0, :5].double().cpu(), dy[0, 0] / eps, rtol=1e-6, atol=0)
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx.double().cpu(), dx_ref, rtol=1e-5, atol=1e-5)


def test_reference_is_f_normalize_in_float32():
    x = torch.randn(3, 4, 8, dtype=torch.bfloat16)
    expected = F.normalize(x.float(), dim=-1).to(torch.bfloat16)
    assert torch.equal(l2_normalize_heads_reference(x), expected)
    assert l2_normalize_heads(x).shape == (3, 4, 8)  # CPU, "auto": the PyTorch form


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="x: expected shape"):
        l2_normalize_heads(torch.randn(8))
    with pytest.raises(ValueError, match="eps: expected > 0"):
        l2_normalize_heads(torch.randn(2, 8), 0.0)
