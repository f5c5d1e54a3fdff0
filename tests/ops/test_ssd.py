"""SSD (Mamba-2) chunkwise against its float64 reference loop."""

from __future__ import annotations

import pytest
import torch

from revival.ops.ssd import ssd, ssd_reference
from tests.ops._helpers import check_float32_and_bfloat16

F64 = torch.float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(seed: int, T: int, n=2, H=4, P=3, G=2, N=5, dt_scale=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, H, P, generator=gen, dtype=F64)
    dt = torch.nn.functional.softplus(torch.randn(n, T, H, generator=gen, dtype=F64)) * dt_scale
    A = -torch.rand(H, generator=gen, dtype=F64) * 4 - 0.1
    B = torch.randn(n, T, G, N, generator=gen, dtype=F64)
    C = torch.randn(n, T, G, N, generator=gen, dtype=F64)
    D = torch.randn(H, generator=gen, dtype=F64)
    state = torch.randn(n, H, P, N, generator=gen, dtype=F64)
    return [t.to(dtype) for t in (x, dt, A, B, C, D, state)]


@pytest.mark.parametrize("T", [1, 7, 16, 33, 100])
@pytest.mark.parametrize("G", [1, 2, 4])
@pytest.mark.parametrize("with_state", [False, True])
def test_forward_matches_reference(T, G, with_state):
    x, dt, A, B, C, D, state = make_inputs(T + G, T, G=G)
    state = state if with_state else None
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, state)
    y, s = ssd(x, dt, A, B, C, D, state, chunk_size=16)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(s, s_ref) < 1e-12


def test_no_skip_and_extreme_decay():
    x, dt, A, B, C, D, state = make_inputs(1, 40, dt_scale=50.0)  # decays to ~0 within a step
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, None, state)
    y, s = ssd(x, dt, A, B, C, None, state, chunk_size=8)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12
    x, dt, A, B, C, D, state = make_inputs(2, 40, dt_scale=1e-4)  # almost no decay
    y_ref, _ = ssd_reference(x, dt, A, B, C, D, state)
    assert rel_err(ssd(x, dt, A, B, C, D, state, chunk_size=8)[0], y_ref) < 1e-12


def test_gradients_match_reference():
    inputs = make_inputs(3, 21)
    grads = {}
    for name, fn in (("fast", lambda *a: ssd(*a, chunk_size=8)), ("ref", ssd_reference)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, s = fn(*leaves)
        weights = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
        ((y * weights).sum() + s.pow(2).sum()).backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for fast, ref in zip(grads["fast"], grads["ref"]):
        assert rel_err(fast, ref) < 1e-11


def test_continuation_equals_one_call():
    x, dt, A, B, C, D, _ = make_inputs(4, 30)
    y_full, s_full = ssd(x, dt, A, B, C, D, chunk_size=8)
    y1, s = ssd(x[:, :19], dt[:, :19], A, B[:, :19], C[:, :19], D, chunk_size=8)
    ys = [y1]
    for t in range(19, 30):
        y_t, s = ssd(x[:, t:t + 1], dt[:, t:t + 1], A, B[:, t:t + 1], C[:, t:t + 1], D, s, chunk_size=8)
        ys.append(y_t)
    assert rel_err(torch.cat(ys, 1), y_full) < 1e-13
    assert rel_err(s, s_full) < 1e-13


def test_float32_and_bfloat16():
    check_float32_and_bfloat16(ssd, ssd_reference, make_inputs(5, 130))


def test_validation_errors_name_the_argument():
    x, dt, A, B, C, D, state = make_inputs(6, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="^x:"):
        ssd(x[0], dt, A, B, C, D)
    with pytest.raises(ValueError, match="^dt:"):
        ssd(x, dt[:, :3], A, B, C, D)
    with pytest.raises(ValueError, match="^A:"):
        ssd(x, dt, A[:2], B, C, D)
    with pytest.raises(ValueError, match="^B:"):
        ssd(x, dt, A, torch.randn(2, 5, 3, 5), C, D)  # 3 groups do not divide 4 heads
    with pytest.raises(ValueError, match="^C:"):
        ssd(x, dt, A, B, C[..., :2], D)
    with pytest.raises(ValueError, match="^D:"):
        ssd(x, dt, A, B, C, D[:1])
    with pytest.raises(ValueError, match="^state:"):
        ssd(x, dt, A, B, C, D, state[:, :, :1])
    with pytest.raises(ValueError, match="^chunk_size:"):
        ssd(x, dt, A, B, C, D, chunk_size=0)
