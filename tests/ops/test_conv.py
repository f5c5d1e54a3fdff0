"""`revival.ops.conv.causal_conv1d` (shifted multiply-adds, hand-written backward) against its float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.ops.conv import causal_conv1d, causal_conv1d_reference

F64 = torch.float64


def _inputs(B, T, D, K, seed, with_state=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=F64)
    weight = torch.randn(D, K, generator=g, dtype=F64)
    bias = torch.randn(D, generator=g, dtype=F64) if with_bias else None
    state = torch.randn(B, K - 1, D, generator=g, dtype=F64) if with_state else None
    return x, weight, bias, state


def _outputs_and_grads(fn, leaves, dy):
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in leaves]
    y, new_state = fn(*leaves)
    (y * dy).sum().backward()
    return [y.detach(), new_state.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("with_state,with_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_fast_path_matches_the_reference_in_float64(K, T, with_state, with_bias, activation):
    leaves = _inputs(2, T, 5, K, seed=10 * K + T, with_state=with_state, with_bias=with_bias)
    dy = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(1), dtype=F64)

    def reference(x, weight, bias, state):
        y, new_state = causal_conv1d_reference(x, weight, bias, state)
        return (F.silu(y) if activation == "silu" else y), new_state

    def fast(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, state, activation=activation)

    for got, ref in zip(_outputs_and_grads(fast, leaves, dy), _outputs_and_grads(reference, leaves, dy)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the decoding path (no autograd Function) gives the same values
        y, new_state = fast(*leaves)
    torch.testing.assert_close(y, reference(*leaves)[0], rtol=1e-12, atol=1e-12)


def test_document_starts_match_the_reference_and_separate_calls():
    x, weight, bias, state = _inputs(2, 11, 3, 4, seed=5)
    starts = torch.zeros(2, 11, dtype=torch.bool)
    starts[0, 4] = starts[1, 1] = starts[1, 2] = True
    dy = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = _outputs_and_grads(lambda *a: causal_conv1d(*a, document_starts=starts), (x, weight, bias, state), dy)
    ref = _outputs_and_grads(lambda *a: causal_conv1d_reference(*a, document_starts=starts), (x, weight, bias, state),
                             dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # row 0: the second document (from step 4) equals a fresh call without state
    y_fresh, _ = causal_conv1d_reference(x[:1, 4:], weight, bias, None)
    torch.testing.assert_close(got[0][:1, 4:], y_fresh, rtol=1e-12, atol=1e-12)


def test_errors_name_the_argument():
    x, weight, bias, state = _inputs(2, 5, 3, 4, seed=0)
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 3, 3\)"):
        causal_conv1d(x, weight, bias, state[:, :2])
    with pytest.raises(ValueError, match="weight: expected shape"):
        causal_conv1d(x, weight[:2], bias, state)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, state, activation="gelu")
