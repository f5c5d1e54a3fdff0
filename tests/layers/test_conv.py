"""CausalConv1d (hand-written backward) against a float64 reference: the conv written as a loop over cat(state, x)."""

from __future__ import annotations

import pytest
import torch

from revival.layers.conv import CausalConv1d


def reference(x, state, weight, bias):
    """y_t = sum_j weight[:, j] * padded[t + j] (+ bias), padded = cat(state, x); state = last K-1 rows of padded."""
    B, T, D = x.shape
    K = weight.shape[1]
    padded = torch.cat([state if state is not None else x.new_zeros(B, K - 1, D), x], dim=1)
    y = torch.stack([(padded[:, t : t + K] * weight.T).sum(1) for t in range(T)], dim=1)
    if bias is not None:
        y = y + bias
    return y, padded[:, T:]


def make(D, K, bias, seed=0):
    torch.manual_seed(seed)
    conv = CausalConv1d(D, K, bias=bias).double()
    if bias:
        torch.nn.init.normal_(conv.bias)
    return conv


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_reference_float64(K, T, with_state, bias):
    B, D = 2, 5
    conv = make(D, K, bias)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=gen, requires_grad=True)
    state = torch.randn(B, K - 1, D, dtype=torch.float64, generator=gen, requires_grad=True) if with_state else None
    y, new_state = conv(x, state)
    y_ref, state_ref = reference(x, state, conv.weight[:, 0], conv.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state, state_ref, rtol=0, atol=0)

    grad_y = torch.randn(B, T, D, dtype=torch.float64, generator=gen)
    grad_s = torch.randn(B, K - 1, D, dtype=torch.float64, generator=gen)
    leaves = [x, conv.weight] + ([conv.bias] if bias else []) + ([state] if with_state else [])
    got = torch.autograd.grad((y * grad_y).sum() + (new_state * grad_s).sum(), leaves)
    want = torch.autograd.grad((y_ref * grad_y).sum() + (state_ref * grad_s).sum(), leaves)
    for g, g_ref in zip(got, want):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_gradcheck_small():
    conv = make(3, 4, True)
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    state = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s, w, b: conv(x, s)[0], (x, state, conv.weight, conv.bias))


def test_strided_input_and_continuation():
    """A column slice as input (as the mLSTM layer passes x_m), and two calls with the state carried == one call."""
    conv = make(4, 4, True)
    both = torch.randn(2, 9, 8, dtype=torch.float64)
    x = both[..., :4]  # strided view
    y_full, s_full = conv(x)
    y1, s1 = conv(x[:, :5])
    y2, s2 = conv(x[:, 5:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2, s_full, rtol=0, atol=0)


def test_float32_matches_float64():
    conv = make(6, 4, True)
    x = torch.randn(3, 11, 6, dtype=torch.float64)
    y64, _ = conv(x)
    y32, _ = conv.float()(x.float())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-6)


def test_state_shape_checked():
    conv = CausalConv1d(4, 4)
    with pytest.raises(ValueError, match="state"):
        conv(torch.randn(1, 3, 4), torch.zeros(1, 2, 4))


@pytest.mark.parametrize("T", [1, 6])
def test_no_grad_path_matches_reference(T):
    """Without autograd (decoding) the conv runs the same ops outside the Function."""
    conv = make(5, 4, True)
    x = torch.randn(2, T, 5, dtype=torch.float64)
    state = torch.randn(2, 3, 5, dtype=torch.float64)
    with torch.no_grad():
        y, new_state = conv(x, state)
        y_ref, state_ref = reference(x, state, conv.weight[:, 0], conv.bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state, state_ref, rtol=0, atol=0)


@pytest.mark.parametrize("with_state", [False, True])
def test_silu_activation_matches_reference_float64(with_state):
    """activation="silu": SiLU of the conv in one node; forward, gradients and the no-grad path as the reference."""
    conv = make(5, 4, True)
    conv.activation = "silu"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    state = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True) if with_state else None
    y, new_state = conv(x, state)
    pre, state_ref = reference(x, state, conv.weight[:, 0], conv.bias)
    y_ref = torch.nn.functional.silu(pre)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_state, state_ref, rtol=0, atol=0)
    grad_y = torch.randn(2, 7, 5, dtype=torch.float64, generator=gen)
    leaves = [x, conv.weight, conv.bias] + ([state] if with_state else [])
    for g, g_ref in zip(torch.autograd.grad(y, leaves, grad_y), torch.autograd.grad(y_ref, leaves, grad_y)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(conv(x, state)[0], y_ref, rtol=1e-12, atol=1e-12)


def test_gradient_in_another_layout_float64():
    """x stored feature-major (as the mLSTM layer hands it over) and the incoming gradient token-major: the backward
    first copies the gradient into x's layout; the gradients are the same as with matching layouts."""
    conv = make(6, 4, True)
    conv.activation = "silu"
    gen = torch.Generator().manual_seed(4)
    memory = torch.randn(6, 2, 9, dtype=torch.float64, generator=gen, requires_grad=True)  # (D, B, T)
    x = memory.permute(1, 2, 0)  # (B, T, D) view
    grad_y = torch.randn(2, 9, 6, dtype=torch.float64, generator=gen)  # contiguous (B, T, D)
    y, _ = conv(x)
    got = torch.autograd.grad(y, [memory, conv.weight, conv.bias], grad_y)
    x_plain = memory.detach().permute(1, 2, 0).contiguous().requires_grad_()
    y_plain, _ = conv(x_plain)
    want = torch.autograd.grad(y_plain, [x_plain, conv.weight, conv.bias], grad_y)
    torch.testing.assert_close(got[0].permute(1, 2, 0), want[0], rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="activation"):
        CausalConv1d(4, 4, activation="gelu")
