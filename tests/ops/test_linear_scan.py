"""minGRU / minLSTM scans and the chunked linear recurrence against their float64 reference loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from revival.ops.linear_scan import (
    g,
    linear_recurrence_chunked,
    linear_recurrence_reference,
    log_g,
    log_space_scan,
    mingru_scan,
    mingru_step,
    minlstm_scan,
    minlstm_step,
)

F64 = torch.float64


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def gate_inputs(seed: int, B: int, T: int, D: int, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, D, generator=gen, dtype=F64) * scale for _ in range(3)], torch.randn(
        B, D, generator=gen, dtype=F64)


def test_g_and_log_g():
    x = torch.linspace(-30, 30, 601, dtype=F64)
    expected = torch.where(x >= 0, x + 0.5, torch.sigmoid(x))
    assert torch.allclose(g(x), expected)
    assert torch.allclose(log_g(x), torch.log(expected))


@pytest.mark.parametrize("T", [1, 7, 64, 100, 4 * 4 * 4 + 3])
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_recurrence_chunked_matches_reference(T, with_h0):
    gen = torch.Generator().manual_seed(T)
    log_a = -torch.rand(2, T, 5, generator=gen, dtype=F64) * 3
    b = torch.randn(2, T, 5, generator=gen, dtype=F64)
    h0 = torch.randn(2, 5, generator=gen, dtype=F64) if with_h0 else None
    h_ref, last_ref = linear_recurrence_reference(log_a, b, h0)
    h, last = linear_recurrence_chunked(log_a, b, h0, chunk_size=4)  # small chunks: exercises the recursion
    assert rel_err(h, h_ref) < 1e-13
    assert rel_err(last, last_ref) < 1e-13
    assert torch.equal(last, h[:, -1])


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 90), chunk=st.integers(2, 9), seed=st.integers(0, 10_000), growth=st.floats(-5.0, 0.5))
def test_linear_recurrence_chunked_property(T, chunk, seed, growth):
    gen = torch.Generator().manual_seed(seed)
    log_a = torch.rand(1, T, 3, generator=gen, dtype=F64) * (growth - 0.1) + 0.05  # mixes decay and mild growth
    b = torch.randn(1, T, 3, generator=gen, dtype=F64)
    h0 = torch.randn(1, 3, generator=gen, dtype=F64)
    h_ref, _ = linear_recurrence_reference(log_a, b, h0)
    h, _ = linear_recurrence_chunked(log_a, b, h0, chunk_size=chunk)
    assert rel_err(h, h_ref) < 1e-11


@pytest.mark.parametrize("impl", ["log", "chunked"])
@pytest.mark.parametrize("T", [1, 9, 65, 130])
@pytest.mark.parametrize("with_h0", [False, True])
def test_mingru_minlstm_forward(impl, T, with_h0):
    (gate, inp, hidden), h0 = gate_inputs(T, 2, T, 6)
    h0 = h0 if with_h0 else None
    for out, ref in (
        (mingru_scan(gate, hidden, h0, impl=impl), mingru_scan(gate, hidden, h0, impl="reference")),
        (minlstm_scan(gate, inp, hidden, h0, impl=impl), minlstm_scan(gate, inp, hidden, h0, impl="reference")),
    ):
        assert rel_err(out[0], ref[0]) < 1e-12
        assert rel_err(out[1], ref[1]) < 1e-12


@pytest.mark.parametrize("impl", ["log", "chunked"])
def test_extreme_gates(impl):
    (gate, inp, hidden), h0 = gate_inputs(1, 2, 50, 4, scale=40.0)  # saturated sigmoids, huge htilde
    for out, ref in (
        (mingru_scan(gate, hidden, h0, impl=impl), mingru_scan(gate, hidden, h0, impl="reference")),
        (minlstm_scan(gate, inp, hidden, h0, impl=impl), minlstm_scan(gate, inp, hidden, h0, impl="reference")),
    ):
        assert rel_err(out[0], ref[0]) < 1e-10


@pytest.mark.parametrize("impl", ["log", "chunked"])
def test_gradients_match_reference(impl):
    (gate, inp, hidden), h0 = gate_inputs(3, 2, 37, 3)
    grads = {}
    for name in (impl, "reference"):
        leaves = [t.clone().requires_grad_() for t in (gate, inp, hidden, h0)]
        h1, last1 = mingru_scan(leaves[0], leaves[2], leaves[3], impl=name, chunk_size=8)
        h2, last2 = minlstm_scan(leaves[0], leaves[1], leaves[2], leaves[3], impl=name, chunk_size=8)
        weights = torch.linspace(-1, 1, h1.numel(), dtype=F64).reshape(h1.shape)
        ((h1 * weights).sum() + (h2 * weights.flip(0)).sum() + last1.sum() - last2.sum()).backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for fast, ref in zip(grads[impl], grads["reference"]):
        assert rel_err(fast, ref) < 1e-11


@pytest.mark.parametrize("impl", ["log", "chunked"])
def test_continuation_and_steps(impl):
    (gate, inp, hidden), _ = gate_inputs(4, 2, 20, 5)
    full, last = minlstm_scan(gate, inp, hidden, impl=impl)
    first, state = minlstm_scan(gate[:, :13], inp[:, :13], hidden[:, :13], impl=impl)
    second, state = minlstm_scan(gate[:, 13:], inp[:, 13:], hidden[:, 13:], state, impl=impl)
    assert rel_err(torch.cat([first, second], 1), full) < 1e-13
    assert rel_err(state, last) < 1e-13
    h = torch.zeros(2, 5, dtype=F64)
    for t in range(20):
        h = mingru_step(gate[:, t], hidden[:, t], h)
    assert rel_err(h, mingru_scan(gate, hidden, impl=impl)[1]) < 1e-13
    h = torch.zeros(2, 5, dtype=F64)
    for t in range(20):
        h = minlstm_step(gate[:, t], inp[:, t], hidden[:, t], h)
    assert rel_err(h, last) < 1e-13


@pytest.mark.parametrize("impl", ["log", "chunked"])
def test_float32_and_bfloat16(impl):
    (gate, inp, hidden), h0 = gate_inputs(5, 2, 200, 8)
    ref, ref_last = minlstm_scan(gate, inp, hidden, h0, impl="reference")
    out, last = minlstm_scan(gate.float(), inp.float(), hidden.float(), h0.float(), impl=impl)
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    assert rel_err(out.double(), ref) < 1e-5
    out, last = minlstm_scan(gate.bfloat16(), inp.bfloat16(), hidden.bfloat16(), impl=impl)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32


def test_log_space_scan_signed_h0():
    gen = torch.Generator().manual_seed(6)
    log_a = -torch.rand(2, 11, 3, generator=gen, dtype=F64)
    log_b = torch.randn(2, 11, 3, generator=gen, dtype=F64)
    h0 = torch.randn(2, 3, generator=gen, dtype=F64) * 5  # negative entries too
    h, last = log_space_scan(log_a, log_b, h0)
    h_ref, last_ref = linear_recurrence_reference(log_a, log_b.exp(), h0)
    assert rel_err(h, h_ref) < 1e-13 and rel_err(last, last_ref) < 1e-13


def test_validation_errors_name_the_argument():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="^hidden:"):
        mingru_scan(x, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="^h0:"):
        mingru_scan(x, x, torch.randn(2, 4))
    with pytest.raises(ValueError, match="^input:"):
        minlstm_scan(x, torch.randn(2, 5), x)
    with pytest.raises(ValueError, match="^impl:"):
        mingru_scan(x, x, impl="fast")
    with pytest.raises(ValueError, match="^log_a:"):
        linear_recurrence_chunked(torch.randn(2, 0, 3), torch.randn(2, 0, 3))
    with pytest.raises(ValueError, match="^chunk_size:"):
        linear_recurrence_chunked(x, x, chunk_size=1)
    with pytest.raises(ValueError, match="^gate:"):
        mingru_scan(torch.ones(2, 5, 3, dtype=torch.long), x)
