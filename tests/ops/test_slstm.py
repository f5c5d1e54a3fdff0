"""sLSTM op: fast paths against the float64 reference (forward, final states, all gradients), gradcheck, continuation,
the first-step rule, extreme pre-activations, dtypes and validation errors."""

from __future__ import annotations

import pytest
import torch

from revival.ops.slstm import slstm, slstm_step
from revival.ops.slstm.fused import slstm_fused_autograd

F64 = torch.float64


def make_inputs(B, T, H, d, *, seed, dtype=F64, state="random", scale=2.0):
    """x_gates (B, T, 4, H, d), recurrent_weight (4, H, d, d) and a state: None, random (n > 0) or mixed (n == 0 in
    some units: the first-step rule applies per unit)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 4, H, d, generator=g, dtype=F64) * scale
    R = torch.randn(4, H, d, d, generator=g, dtype=F64) * d**-0.5
    if state is None:
        s = None
    else:
        c = torch.randn(B, H, d, generator=g, dtype=F64)
        n = torch.rand(B, H, d, generator=g, dtype=F64) + 0.5
        m = torch.randn(B, H, d, generator=g, dtype=F64)
        y = torch.randn(B, H, d, generator=g, dtype=F64)
        if state == "mixed":
            empty = torch.rand(B, H, d, generator=g) < 0.5
            c, n = c.masked_fill(empty, 0.0), n.masked_fill(empty, 0.0)
        s = tuple(t.to(dtype) for t in (c, n, m, y))
    return x.to(dtype), R.to(dtype), s


def run(impl, x, R, state):
    if impl == "fused-autograd":
        if state is None:
            zeros = torch.zeros(x.shape[0], x.shape[3], x.shape[4], dtype=x.dtype)
            state = (zeros, zeros, zeros, zeros)
        return slstm_fused_autograd(x, R, state)
    return slstm(x, R, state, impl=impl)


def outputs_and_grads(impl, x, R, state, seed=123):
    """Forward, then backward of a random linear function of y and all four final states."""
    x, R = x.clone().requires_grad_(), R.clone().requires_grad_()
    state = None if state is None else tuple(s.clone().requires_grad_() for s in state)
    y, final = run(impl, x, R, state)
    outs = [y, *final]
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    grads = [x.grad, R.grad] + ([] if state is None else [s.grad for s in state])
    return [o.detach() for o in outs], grads


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("impl", ["fused", "fused-autograd"])
@pytest.mark.parametrize(
    "B, T, H, d, state",
    [(2, 7, 2, 5, None), (3, 13, 1, 8, "random"), (1, 5, 3, 4, "mixed"), (2, 1, 2, 3, "random"), (1, 1, 1, 1, None)],
)
def test_matches_reference_float64(impl, B, T, H, d, state):
    x, R, s = make_inputs(B, T, H, d, seed=B * 100 + T, state=state)
    outs, grads = outputs_and_grads(impl, x, R, s)
    ref_outs, ref_grads = outputs_and_grads("reference", x, R, s)
    names = ["y", "c", "n", "m", "y_last", "grad x_gates", "grad recurrent_weight", "grad c0", "grad n0", "grad m0"]
    for name, a, b in zip(names + ["grad y0"], outs + grads, ref_outs + ref_grads):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-9, (name, rel_err(a, b))


def test_gradcheck_fused():
    x, R, s = make_inputs(2, 4, 2, 3, seed=1, scale=1.0)
    inputs = [t.clone().requires_grad_() for t in (x, R, *s)]

    def fn(x, R, c, n, m, y):
        out, final = slstm(x, R, (c, n, m, y), impl="fused")
        return (out, *final)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_gradcheck_fused_zero_state():
    x, R, _ = make_inputs(1, 5, 2, 2, seed=2, state=None, scale=1.0)
    inputs = [t.clone().requires_grad_() for t in (x, R)]

    def fn(x, R):
        out, final = slstm(x, R, impl="fused")
        return (out, *final)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_continuation(impl):
    x, R, s = make_inputs(2, 9, 2, 4, seed=3, state="random")
    y_full, final_full = slstm(x, R, s, impl=impl)
    for split in range(1, 9):
        y_a, state = slstm(x[:, :split], R, s, impl=impl)
        y_b, final = slstm(x[:, split:], R, state, impl=impl)
        assert rel_err(torch.cat([y_a, y_b], dim=1), y_full) < 1e-12, split
        for a, b in zip(final, final_full):
            assert rel_err(a, b) < 1e-12, split


def test_step_matches_sequence():
    x, R, _ = make_inputs(2, 6, 3, 4, seed=4, state=None)
    y_full, final_full = slstm(x, R)
    state, ys = None, []
    for t in range(x.shape[1]):
        y_t, state = slstm_step(x[:, t], R, state)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, dim=1), y_full) < 1e-12
    for a, b in zip(state, final_full):
        assert rel_err(a, b) < 1e-12


def test_first_step_sets_m_to_i_per_unit():
    x, R, s = make_inputs(2, 1, 2, 3, seed=5, state="mixed")
    c0, n0, m0, y0 = s
    _, (c, n, m, _) = slstm(x, R, s, impl="fused")
    i = x[:, 0, 0] + torch.einsum("bhd,hde->bhe", y0, R[0])
    empty = n0 == 0
    assert empty.any() and (~empty).any()
    assert torch.equal(m[empty], i[empty])
    assert torch.allclose(n[empty], torch.ones_like(n[empty]))  # n = ibar = exp(i - i)
    assert (m[~empty] >= i[~empty]).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_extreme_preactivations_finite(impl, dtype):
    g = torch.Generator().manual_seed(6)
    B, T, H, d = 2, 8, 2, 3
    x = (torch.randint(0, 2, (B, T, 4, H, d), generator=g) * 2 - 1).to(dtype) * 1e4
    R = torch.randn(4, H, d, d, generator=g).to(dtype) * 10
    outs, grads = outputs_and_grads(impl, x, R, None)
    for t in outs + grads:
        assert torch.isfinite(t).all()
    if dtype == F64 and impl == "fused":
        ref_outs, ref_grads = outputs_and_grads("reference", x, R, None)
        for a, b in zip(outs + grads, ref_outs + ref_grads):
            assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("impl", ["fused", "fused-autograd"])
def test_ties_between_input_and_forget_match_reference(impl):
    # zero inputs and a saturated forget gate: logsigmoid(f) == 0 and m_{t-1} == i == 0, so i == logfm exactly
    B, T, H, d = 2, 4, 1, 3
    x = torch.zeros(B, T, 4, H, d, dtype=F64)
    x[:, :, 1] = 800.0
    R = torch.zeros(4, H, d, d, dtype=F64)
    outs, grads = outputs_and_grads(impl, x, R, None)
    ref_outs, ref_grads = outputs_and_grads("reference", x, R, None)
    for a, b in zip(outs + grads, ref_outs + ref_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_bfloat16_input_accepted():
    x, R, _ = make_inputs(2, 5, 2, 4, seed=7, dtype=torch.float32, state=None)
    y32, state32 = slstm(x, R)
    y16, state16 = slstm(x.to(torch.bfloat16), R)
    assert y16.dtype == torch.bfloat16
    assert all(s.dtype == torch.float32 for s in state16)
    assert rel_err(y16.float(), y32) < 2e-2
    y_step, step_state = slstm_step(x[:, 0].to(torch.bfloat16), R)
    assert y_step.dtype == torch.bfloat16 and step_state[0].dtype == torch.float32


def test_autocast_does_not_lower_the_recurrence():
    x, R, s = make_inputs(2, 6, 2, 4, seed=11, dtype=torch.float32, state="random")
    y_plain, _ = slstm(x, R, s)
    for impl in ("fused", "reference"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = slstm(x, R, s, impl=impl)
            y_step, _ = slstm_step(x[:, 0], R, s)
        assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in state)
        assert rel_err(y, y_plain) < 1e-6, impl
        assert rel_err(y_step, y_plain[:, 0]) < 1e-6


def test_float32_close_to_float64_and_state_dtypes():
    x, R, s = make_inputs(2, 16, 2, 8, seed=8, state="random")
    y64, st64 = slstm(x, R, s)
    y32, st32 = slstm(x.float(), R.float(), tuple(t.float() for t in s))
    assert y32.dtype == torch.float32 and all(t.dtype == torch.float32 for t in st32)
    assert all(t.dtype == F64 for t in st64)
    assert rel_err(y32.double(), y64) < 1e-5


def test_inputs_not_modified_and_partial_grads():
    x, R, s = make_inputs(2, 4, 2, 3, seed=9, dtype=torch.float32, state="random")
    x_copy, s_copy = x.clone(), tuple(t.clone() for t in s)
    xs = x.clone().requires_grad_()
    y, _ = slstm(xs, R, s)
    y.sum().backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all()
    assert torch.equal(x, x_copy) and all(torch.equal(a, b) for a, b in zip(s, s_copy))
    Rs = R.clone().requires_grad_()
    y, _ = slstm(x, Rs)
    y.sum().backward()
    assert Rs.grad is not None and Rs.grad.shape == R.shape


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, R: slstm(x[:, :, :3], R), "x_gates"),
        (lambda x, R: slstm(x[0], R), "x_gates"),
        (lambda x, R: slstm(x[:, :0], R), "x_gates"),
        (lambda x, R: slstm(x.long(), R), "x_gates"),
        (lambda x, R: slstm(x, R[:, :1]), "recurrent_weight"),
        (lambda x, R: slstm(x, R[..., :2]), "recurrent_weight"),
        (lambda x, R: slstm(x, R, "state"), "state"),
        (lambda x, R: slstm(x, R, (x[:, 0, 0],) * 3), "state"),
        (lambda x, R: slstm(x, R, (x[:, 0, 0],) * 3 + (x[0, 0],)), r"state\[3\] \(y\)"),
        (lambda x, R: slstm(x, R, impl="triton-ish"), "impl"),
        (lambda x, R: slstm_step(x, R), "x_gates_t"),
        (lambda x, R: slstm_step(x[:, 0], R[:3]), "recurrent_weight"),
    ],
)
def test_validation_errors(call, match):
    x, R, _ = make_inputs(2, 3, 2, 4, seed=10, dtype=torch.float32, state=None)
    with pytest.raises(ValueError, match=match):
        call(x, R)
