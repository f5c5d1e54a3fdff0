"""Gated delta rule chunkwise (WY) against its float64 reference loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.ops.delta_rule import gated_delta_rule, gated_delta_rule_reference
from tests.ops._helpers import check_float32_and_bfloat16

F64 = torch.float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(seed: int, T: int, n=2, H=3, Dk=4, Dv=5, g_scale=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, T, H, Dk, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(n, T, H, Dk, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(n, T, H, Dv, generator=gen, dtype=F64)
    g = -torch.rand(n, T, H, generator=gen, dtype=F64) * g_scale
    beta = torch.rand(n, T, H, generator=gen, dtype=F64)
    state = torch.randn(n, H, Dk, Dv, generator=gen, dtype=F64)
    return [t.to(dtype) for t in (q, k, v, g, beta, state)]


def test_reference_matches_the_documented_update():
    """S_t = a (I - beta k k^T) S_{t-1} + beta k v^T, o = S^T (q / sqrt(Dk)), checked with explicit matrices."""
    q, k, v, g, beta, state = make_inputs(0, 3, n=1, H=1)
    S = state[0, 0]
    for t in range(3):
        kt, vt = k[0, t, 0], v[0, t, 0]
        S = g[0, t, 0].exp() * (torch.eye(4, dtype=F64) - beta[0, t, 0] * torch.outer(kt, kt)) @ S
        S = S + beta[0, t, 0] * torch.outer(kt, vt)
    o, s = gated_delta_rule_reference(q, k, v, g, beta, state)
    assert rel_err(s[0, 0], S) < 1e-14
    assert rel_err(o[0, -1, 0], S.T @ q[0, -1, 0] / 2.0) < 1e-14
    o_unscaled, _ = gated_delta_rule_reference(q, k, v, g, beta, state, scale=1.0)
    assert rel_err(o_unscaled, 2.0 * o) < 1e-14


@pytest.mark.parametrize("T", [1, 6, 16, 37, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_reference(T, with_state):
    q, k, v, g, beta, state = make_inputs(T, T)
    state = state if with_state else None
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, state)
    o, s = gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12


@pytest.mark.parametrize("g_scale", [0.0, 30.0])
def test_extreme_gates(g_scale):
    q, k, v, g, beta, state = make_inputs(1, 40, g_scale=g_scale)
    beta = torch.where(beta > 0.5, torch.ones_like(beta), torch.zeros_like(beta))  # beta at the ends of [0, 1]
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, state)
    o, s = gated_delta_rule(q, k, v, g, beta, state, chunk_size=16)
    assert rel_err(o, o_ref) < 1e-11 and rel_err(s, s_ref) < 1e-11


def test_gradients_match_reference():
    inputs = make_inputs(2, 23)
    grads = {}
    for name, fn in (("fast", lambda *a: gated_delta_rule(*a, chunk_size=8)), ("ref", gated_delta_rule_reference)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        o, s = fn(*leaves)
        weights = torch.linspace(-1, 1, o.numel(), dtype=F64).reshape(o.shape)
        ((o * weights).sum() + s.pow(2).sum()).backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for fast, ref in zip(grads["fast"], grads["ref"]):
        assert rel_err(fast, ref) < 1e-11


def test_continuation_equals_one_call():
    q, k, v, g, beta, _ = make_inputs(3, 30)
    o_full, s_full = gated_delta_rule(q, k, v, g, beta, chunk_size=8)
    o1, s = gated_delta_rule(q[:, :19], k[:, :19], v[:, :19], g[:, :19], beta[:, :19], chunk_size=8)
    outputs = [o1]
    for t in range(19, 30):
        sl = slice(t, t + 1)
        o_t, s = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], s, chunk_size=8)
        outputs.append(o_t)
    assert rel_err(torch.cat(outputs, 1), o_full) < 1e-13
    assert rel_err(s, s_full) < 1e-13


def test_float32_and_bfloat16():
    check_float32_and_bfloat16(gated_delta_rule, gated_delta_rule_reference, make_inputs(4, 130))


def test_validation_errors_name_the_argument():
    q, k, v, g, beta, state = make_inputs(5, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="^q:"):
        gated_delta_rule(q[0], k, v, g, beta)
    with pytest.raises(ValueError, match="^k:"):
        gated_delta_rule(q, k[..., :2], v, g, beta)
    with pytest.raises(ValueError, match="^v:"):
        gated_delta_rule(q, k, v[:, :2], g, beta)
    with pytest.raises(ValueError, match="^g:"):
        gated_delta_rule(q, k, v, g[..., :1], beta)
    with pytest.raises(ValueError, match="^beta:"):
        gated_delta_rule(q, k, v, g, beta[:1])
    with pytest.raises(ValueError, match="^state:"):
        gated_delta_rule(q, k, v, g, beta, state[..., :2])
    with pytest.raises(ValueError, match="^chunk_size:"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=0)
