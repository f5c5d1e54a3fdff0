"""Mamba-3 op: the chunkwise form against the float64 loop (forward, state, gradients), its reduction to SSD, state
carried across calls, float32 against float64, errors."""

from __future__ import annotations

import pytest
import torch

from revival.ops.mamba3 import mamba3, mamba3_reference
from revival.ops.ssd import ssd_reference

F64 = torch.float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_inputs(seed: int, T: int, R: int, n: int = 2, H: int = 3, P: int = 4, N: int = 6, dtype=F64) -> list:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    x = randn(n, T, H, R, P)
    dt = torch.rand(n, T, H, generator=g, dtype=F64) * 0.5 + 0.05
    A = -torch.rand(H, generator=g, dtype=F64) * 2 - 0.1
    lam = torch.rand(n, T, H, generator=g, dtype=F64)
    B, C = randn(n, T, H, R, N), randn(n, T, H, R, N)
    theta = randn(n, T, H, N // 2) * 2
    D = randn(H)
    return [t.to(dtype) for t in (x, dt, A, lam, B, C, theta, D)]


def make_state(seed: int, n: int = 2, H: int = 3, R: int = 1, P: int = 4, N: int = 6) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=F64) for shape in
                 ((n, H, N // 2), (n, H, P, N), (n, H, R, N), (n, H, R, P)))


@pytest.mark.parametrize("R", [1, 3])
@pytest.mark.parametrize("T,chunk_size", [(1, 4), (8, 4), (13, 4), (11, 16)])
def test_chunkwise_equals_reference_float64(R, T, chunk_size):
    inputs = make_inputs(0, T, R)
    state = make_state(1, R=R)
    y_ref, state_ref = mamba3_reference(*inputs, state=state)
    y, state_out = mamba3(*inputs, state=state, chunk_size=chunk_size)
    assert rel_err(y, y_ref) < 1e-12
    for got, want in zip(state_out, state_ref):
        assert rel_err(got, want) < 1e-12


def test_gradients_equal_reference_float64():
    inputs = [t.requires_grad_() for t in make_inputs(2, 10, 2)]
    state = tuple(t.requires_grad_() for t in make_state(3, R=2))
    weights = torch.randn(2, 10, 3, 2, 4, generator=torch.Generator().manual_seed(4), dtype=F64)

    def grads(fn, **kw):
        y, (angle, ssm, prev_B, prev_x) = fn(*inputs, state=state, **kw)
        loss = (y * weights).sum() + ssm.square().sum() + angle.sin().sum() + prev_B.sum() + prev_x.sum()
        return torch.autograd.grad(loss, [*inputs, *state])

    for got, want in zip(grads(mamba3, chunk_size=4), grads(mamba3_reference)):
        assert rel_err(got, want) < 1e-11


def test_euler_without_rotation_is_ssd():
    """lam = 1 (no previous-token term), theta = 0 (no rotation), R = 1: Mamba-2's SSD."""
    x, dt, A, lam, B, C, theta, D = make_inputs(5, 12, 1)
    y, state = mamba3(x, dt, A, torch.ones_like(lam), B, C, torch.zeros_like(theta), D, chunk_size=5)
    y_ssd, state_ssd = ssd_reference(x[:, :, :, 0], dt, A, B[:, :, :, 0], C[:, :, :, 0], D)
    assert rel_err(y[:, :, :, 0], y_ssd) < 1e-12
    assert rel_err(state[1], state_ssd) < 1e-12


def test_trapezoid_and_rotation_change_the_output():
    """The op is not SSD in disguise: the previous-token term and the angles each move y."""
    x, dt, A, lam, B, C, theta, D = make_inputs(6, 9, 1)
    y = mamba3(x, dt, A, lam, B, C, theta, D)[0]
    assert rel_err(mamba3(x, dt, A, torch.ones_like(lam), B, C, theta, D)[0], y) > 1e-2
    assert rel_err(mamba3(x, dt, A, lam, B, C, torch.zeros_like(theta), D)[0], y) > 1e-2


def test_state_carries_across_calls():
    inputs = make_inputs(7, 15, 2)
    y_full, state_full = mamba3(*inputs, chunk_size=4)
    first, second = ([t[:, :6] for t in inputs[:2]], [t[:, 6:] for t in inputs[:2]])
    A = inputs[2]
    rest_first = [t[:, :6] for t in inputs[3:7]]
    rest_second = [t[:, 6:] for t in inputs[3:7]]
    D = inputs[7]
    y1, state = mamba3(*first, A, *rest_first, D, chunk_size=4)
    y2, state = mamba3(*second, A, *rest_second, D, state=state, chunk_size=4)
    assert rel_err(torch.cat([y1, y2], dim=1), y_full) < 1e-12
    for got, want in zip(state, state_full):
        assert rel_err(got, want) < 1e-12


def test_float32_close_to_float64_reference():
    inputs = make_inputs(8, 40, 2)
    y_ref, state_ref = mamba3_reference(*inputs)
    y, state = mamba3(*[t.float() for t in inputs], chunk_size=16)
    assert y.dtype == torch.float32 and state[1].dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4
    assert rel_err(state[1], state_ref[1]) < 1e-4


STARTS = {"t0": [0], "inside": [5], "in_a_row": [3, 4], "chunk_boundary": [4, 8], "last": [12]}


@pytest.mark.parametrize("where", list(STARTS))
def test_document_starts_chunkwise_equals_reference_and_separate_calls(where):
    inputs = make_inputs(10, 13, 2)
    state = make_state(11, R=2)
    starts = torch.zeros(2, 13, dtype=torch.bool)
    starts[0, STARTS[where]] = True  # row 1 has none: it keeps the state throughout
    y_ref, state_ref = mamba3_reference(*inputs, state=state, document_starts=starts)
    y, state_out = mamba3(*inputs, state=state, chunk_size=4, document_starts=starts)
    assert rel_err(y, y_ref) < 1e-12
    for got, want in zip(state_out, state_ref):
        assert rel_err(got, want) < 1e-12
    last = STARTS[where][-1]  # row 0's last document, run alone from a zero state
    x, dt, A, lam, B, C, theta, D = inputs
    alone = [t[:1, last:] for t in (x, dt)] + [A] + [t[:1, last:] for t in (lam, B, C, theta)] + [D]
    y_alone, state_alone = mamba3_reference(*alone)
    assert rel_err(y[:1, last:], y_alone) < 1e-12
    for got, want in zip(state_out, state_alone):
        assert rel_err(got[:1], want) < 1e-12
    y_plain = mamba3_reference(*[t[1:] if t.ndim > 1 else t for t in inputs],
                               state=tuple(t[1:] for t in state))[0]
    assert rel_err(y[1:], y_plain) < 1e-12


def test_errors_name_the_argument():
    x, dt, A, lam, B, C, theta, D = make_inputs(9, 4, 1)
    with pytest.raises(ValueError, match="B: expected an even state size"):
        mamba3(x, dt, A, lam, B[..., :5], C[..., :5], theta[..., :2], D)
    with pytest.raises(ValueError, match="theta: expected shape"):
        mamba3(x, dt, A, lam, B, C, theta[..., :2], D)
    with pytest.raises(ValueError, match="state: expected None or a tuple"):
        mamba3(x, dt, A, lam, B, C, theta, D, state=torch.zeros(2))
    with pytest.raises(ValueError, match="state ssm: expected shape"):
        state = make_state(0)
        mamba3(x, dt, A, lam, B, C, theta, D, state=(state[0], state[1][..., :4], state[2], state[3]))
    with pytest.raises(ValueError, match="chunk_size"):
        mamba3(x, dt, A, lam, B, C, theta, D, chunk_size=0)
