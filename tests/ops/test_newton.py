"""revival.ops.newton against the sequential loop in float64: the scans, ELK's smoother, the cells' Jacobians, every
method x cell forward (~1e-10) and backward (vs autograd through the loop), continuation, T = 1 and odd T, warm
starts, non-convergence handling and extreme pre-activations."""

from __future__ import annotations

import pytest
import torch

from revival.ops.newton import (
    DENSE_GRU,
    DENSE_LSTM,
    METHODS,
    PARAGRU,
    PARALSTM,
    SLSTM,
    Cell,
    NewtonConvergenceError,
    autograd_jacobian,
    elk_step,
    linear_scan,
    linear_scan_reference,
    newton_solve,
    sequential_solve,
    slstm_newton,
)
from revival.ops.newton.elk import elk_step_dense
from revival.ops.newton.slstm import slstm_state_to_newton

F64 = torch.float64


def make_problem(name: str, B: int, T: int, *, seed: int = 0, scale: float = 1.0):
    """(cell, x, h0, weights) in float64 for the named cell."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * s

    N, H, d = 5, 2, 3
    if name == "paragru":
        return PARAGRU, randn(B, T, 3, N, s=scale), randn(B, N, s=0.5), (randn(3, N),)
    if name == "paralstm":
        return PARALSTM, randn(B, T, 3, N, s=scale), randn(B, N, 2, s=0.5), (randn(3, N), randn(2, N))
    if name == "slstm":
        c, y, m = randn(B, H, d), randn(B, H, d), randn(B, H, d)
        n = torch.rand(B, H, d, generator=g, dtype=F64) + 0.5
        n[0] = 0.0  # an empty memory in the first batch row
        h0 = slstm_state_to_newton((c, n, m, y))
        return SLSTM, randn(B, T, 4, H, d, s=scale), h0, (randn(4, H, d, d, s=d**-0.5),)
    if name == "dense_gru":
        return DENSE_GRU, randn(B, T, 3, N, s=scale), randn(B, 1, N, s=0.5), (randn(3, N, N, s=0.5), randn(N))
    if name == "dense_lstm":
        return DENSE_LSTM, randn(B, T, 4, N, s=scale), randn(B, 1, 2 * N, s=0.5), (randn(4, N, N, s=0.5),)
    raise AssertionError(name)


CELLS = ("paragru", "paralstm", "slstm", "dense_gru", "dense_lstm")


# scans ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 2, 7, 33])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_matches_loop(T, reverse):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(2, T, 4, generator=g, dtype=F64) * 2.4 - 1.2
    b = torch.randn(2, T, 4, generator=g, dtype=F64)
    A = torch.randn(2, T, 3, 4, 4, generator=g, dtype=F64) * 0.5
    bb = torch.randn(2, T, 3, 4, generator=g, dtype=F64)
    A2 = torch.randn(2, T, 3, 2, 2, generator=g, dtype=F64) * 0.7  # 2 x 2 blocks: the elementwise path
    b2 = torch.randn(2, T, 3, 2, generator=g, dtype=F64)
    for coeff, rhs, structure in ((a, b, "diagonal"), (A, bb, "block"), (A2, b2, "block"), (A2.mT, b2, "block")):
        got = linear_scan(coeff, rhs, structure=structure, reverse=reverse)
        want = linear_scan_reference(coeff, rhs, structure=structure, reverse=reverse)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_linear_scan_rejects_bad_shapes():
    with pytest.raises(ValueError, match="structure"):
        linear_scan(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), structure="tridiagonal")
    with pytest.raises(ValueError, match="coeff"):
        linear_scan(torch.zeros(1, 2, 3, 2, 2), torch.zeros(1, 2, 3, 3), structure="block")


@pytest.mark.parametrize("damping", [0.0, 0.1, 3.0])
def test_elk_step_is_the_least_squares_solution(damping):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 19, 3, generator=g, dtype=F64) * 1.5  # |a| > 1 too: the smoother must not care
    r = torch.randn(2, 19, 3, generator=g, dtype=F64)
    # relative: with |a| > 1 the undamped solution grows like 1.5^T and the dense normal equations lose digits
    torch.testing.assert_close(elk_step(a, r, damping), elk_step_dense(a, r, damping), rtol=1e-8, atol=1e-11)


# cells ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["paragru", "paralstm", "slstm"])
def test_analytic_jacobians_match_autodiff(name):
    cell, x, h0, weights = make_problem(name, 2, 6, scale=2.0)
    g = torch.Generator().manual_seed(2)
    h_prev = torch.randn((2, 6, *h0.shape[1:]), generator=g, dtype=F64)
    value, jac = cell.jacobian(h_prev, x, *weights)
    _, diag = cell.jacobian(h_prev, x, *weights, diagonal=True)
    if cell.structure == "diagonal":  # as a block cell with 1 x 1 blocks

        def step(h, x, *weights):
            return cell.step(h[..., 0], x, *weights)[..., None]

        want_value, want = autograd_jacobian(step, h_prev[..., None], x, *weights)
        want_value, want = want_value[..., 0], want[..., 0, 0]
    else:
        want_value, want = autograd_jacobian(cell.step, h_prev, x, *weights)
    torch.testing.assert_close(value, want_value, rtol=0, atol=1e-13)
    torch.testing.assert_close(jac, want, rtol=0, atol=1e-13)
    want_diag = want if cell.structure == "diagonal" else torch.diagonal(want, dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, want_diag, rtol=0, atol=1e-13)


# the solver -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("method", METHODS)
def test_solve_matches_sequential_loop(name, method):
    T = 5 if name.startswith("dense") else 23
    cell, x, h0, weights = make_problem(name, 2, T, scale=1.5)
    want = sequential_solve(cell, x, h0, weights)
    h, result = newton_solve(cell, x, h0, weights, method=method)
    assert result.converged and not result.fell_back and result.residual <= 1e-12
    if method != "elk":
        assert result.iterations <= T
    torch.testing.assert_close(h, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", CELLS)
def test_t1_and_odd_t(name):
    for T in (1, 3):
        cell, x, h0, weights = make_problem(name, 1, T, seed=T)
        h, result = newton_solve(cell, x, h0, weights)
        torch.testing.assert_close(h, sequential_solve(cell, x, h0, weights), rtol=0, atol=1e-12)
        assert result.iterations <= T  # the guess f(h0, x_1) is already exact at t = 1


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("method", ["deer", "quasi"])
def test_gradients_match_autograd_through_the_loop(name, method):
    T = 4 if name.startswith("dense") else 13
    cell, x, h0, weights = make_problem(name, 2, T, scale=1.5)
    h0_grad = bool(torch.isfinite(h0).all())  # the sLSTM's empty memory (log n = -inf) is not differentiable
    leaves = [x, *weights] + ([h0] if h0_grad else [])
    cotangent = torch.randn((2, T, *h0.shape[1:]), generator=torch.Generator().manual_seed(3), dtype=F64)

    def grads(solve):
        inputs = [t.clone().requires_grad_() for t in leaves]
        xs, ws = inputs[0], tuple(inputs[1:1 + len(weights)])
        h = solve(xs, inputs[-1] if h0_grad else h0, ws)
        return torch.autograd.grad((h * cotangent).sum(), inputs)

    got = grads(lambda xs, h0s, ws: newton_solve(cell, xs, h0s, ws, method=method)[0])
    want = grads(lambda xs, h0s, ws: sequential_solve(cell, xs, h0s, ws))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_gradcheck_paralstm():
    cell, x, h0, (a, p) = make_problem("paralstm", 1, 4)
    torch.autograd.gradcheck(lambda x, h0, a, p: newton_solve(cell, x, h0, (a, p))[0],
                             tuple(t.clone().requires_grad_() for t in (x, h0, a, p)))


@pytest.mark.parametrize("name", ["paragru", "paralstm", "slstm"])
def test_continuation_with_states(name):
    cell, x, h0, weights = make_problem(name, 2, 20)
    whole, _ = newton_solve(cell, x, h0, weights)
    first, _ = newton_solve(cell, x[:, :9], h0, weights)
    second, _ = newton_solve(cell, x[:, 9:], first[:, -1], weights)
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole, rtol=0, atol=1e-12)


def test_warm_start_from_the_solution_takes_no_iteration():
    cell, x, h0, weights = make_problem("paralstm", 2, 15)
    h, _ = newton_solve(cell, x, h0, weights)
    again, result = newton_solve(cell, x, h0, weights, initial_guess=h)
    assert result.iterations == 0 and result.converged
    torch.testing.assert_close(again, h, rtol=0, atol=0)
    with pytest.raises(ValueError, match="initial_guess"):
        newton_solve(cell, x, h0, weights, initial_guess=h[:, 1:])


def test_non_convergence_raises_falls_back_or_returns():
    cell, x, h0, weights = make_problem("slstm", 2, 17, scale=2.0)
    want = sequential_solve(cell, x, h0, weights)
    with pytest.raises(NewtonConvergenceError, match="did not converge") as info:
        newton_solve(cell, x, h0, weights, method="quasi", max_iters=2)
    assert info.value.result.iterations == 2 and not info.value.result.converged
    h, result = newton_solve(cell, x, h0, weights, method="quasi", max_iters=2, on_failure="sequential")
    assert result.fell_back and not result.converged and result.residual <= 1e-12
    torch.testing.assert_close(h, want, rtol=0, atol=0)
    h, result = newton_solve(cell, x, h0, weights, method="quasi", max_iters=2, on_failure="return")
    assert not result.converged and result.iterations == 2 and result.residual > 1e-12
    assert (h - want).abs().max() > 1e-8  # the partial iterate really is returned, and says so


def _tanh_step(h, x, w):
    return torch.tanh(w * h + x)


def _tanh_jacobian(h, x, w, *, diagonal=False):
    value = torch.tanh(w * h + x)
    return value, w * (1 - value * value)


# a bistable diagonal tanh RNN: its linearisation expands (|J| up to 3), so undamped Newton steps overflow
TANH = Cell("tanh", "diagonal", _tanh_step, _tanh_jacobian)


def test_divergent_iterates_are_reported_and_elk_stays_stable():
    x = torch.randn(1, 1024, 8, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.1
    h0, weights = torch.zeros(1, 8, dtype=F64), (torch.full((8,), 3.0, dtype=F64),)
    want = sequential_solve(TANH, x, h0, weights)
    with pytest.raises(NewtonConvergenceError, match="residual nan"):
        newton_solve(TANH, x, h0, weights, method="deer")
    h, result = newton_solve(TANH, x, h0, weights, method="deer", on_failure="sequential")
    assert result.fell_back and torch.equal(h, want)
    h, result = newton_solve(TANH, x, h0, weights, method="elk")  # the trust region keeps every step finite
    assert result.converged and result.iterations <= 1024
    torch.testing.assert_close(h, want, rtol=0, atol=1e-10)


def test_elk_with_damping_still_solves():
    cell, x, h0, weights = make_problem("paragru", 2, 16)
    h, result = newton_solve(cell, x, h0, weights, method="elk", damping=0.1)
    assert result.converged and result.iterations <= 2 * 16 + 32
    torch.testing.assert_close(h, sequential_solve(cell, x, h0, weights), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["paragru", "paralstm", "slstm"])
def test_extreme_pre_activations_stay_finite(name):
    cell, x, h0, weights = make_problem(name, 2, 12, scale=1e4)
    want = sequential_solve(cell, x, h0, weights)
    for method in METHODS:
        h, result = newton_solve(cell, x, h0, weights, method=method)
        assert torch.isfinite(h).all() and result.converged
        torch.testing.assert_close(h, want, rtol=1e-12, atol=1e-9)


def test_arguments_are_validated():
    cell, x, h0, weights = make_problem("paragru", 1, 3)
    for kwargs, match in (({"method": "newton"}, "method"), ({"on_failure": "ignore"}, "on_failure"),
                          ({"damping": -1.0}, "damping"),
                          ({"trust_radius": 0.0}, "trust_radius"), ({"scan_impl": "cuda"}, "scan_impl"),
                          ({"max_iters": -1}, "max_iters")):
        with pytest.raises(ValueError, match=match):
            newton_solve(cell, x, h0, weights, **kwargs)
    with pytest.raises(ValueError, match="h0"):
        newton_solve(cell, x, h0[:0], weights)
    with pytest.raises(ValueError, match="cell"):
        newton_solve("paragru", x, h0, weights)


def test_float32_inputs_compute_in_float32():
    cell, x, h0, weights = make_problem("paragru", 2, 16)
    h, result = newton_solve(cell, x.float(), h0.float(), tuple(w.float() for w in weights))
    assert h.dtype == torch.float32 and result.converged and result.tol == 1e-5
    torch.testing.assert_close(h.double(), sequential_solve(cell, x, h0, weights), rtol=0, atol=1e-5)


# the sLSTM op interface -------------------------------------------------------------------------------------------

def test_slstm_newton_matches_the_slstm_op():
    from revival.ops.slstm.reference import slstm_reference

    g = torch.Generator().manual_seed(5)
    B, T, H, d = 2, 11, 2, 4
    x = torch.randn(B, T, 4, H, d, generator=g, dtype=F64) * 2
    R = torch.randn(4, H, d, d, generator=g, dtype=F64) * d**-0.5
    zeros = torch.zeros(B, H, d, dtype=F64)
    want_y, want_state = slstm_reference(x, R, (zeros,) * 4)
    y, state, result = slstm_newton(x, R, (zeros,) * 4)
    assert result.converged
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-10)
    # same memory: c / n, m + log n and y agree (the stabiliser may differ)
    c, n, m, y_last = state
    wc, wn, wm, wy = want_state
    torch.testing.assert_close(c / n, wc / wn, rtol=0, atol=1e-10)
    torch.testing.assert_close(m + n.log(), wm + wn.log(), rtol=0, atol=1e-10)
    torch.testing.assert_close(y_last, wy, rtol=0, atol=1e-12)
    # continuing from the returned state gives the sequential op's continuation
    more = torch.randn(B, 5, 4, H, d, generator=g, dtype=F64)
    torch.testing.assert_close(slstm_newton(more, R, state)[0], slstm_reference(more, R, want_state)[0],
                               rtol=0, atol=1e-10)


def test_slstm_op_impl_newton():
    from revival.ops import slstm

    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 4, 2, 4, generator=g, dtype=F64)
    R = torch.randn(4, 2, 4, 4, generator=g, dtype=F64) * 0.5
    torch.testing.assert_close(slstm(x, R, impl="newton")[0], slstm(x, R, impl="reference")[0], rtol=0, atol=1e-10)


# document starts --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("method", METHODS)
def test_document_starts_equal_separate_calls(name, method):
    cell, x, h0, weights = make_problem(name, 2, 14)
    starts = torch.zeros(2, 14, dtype=torch.bool)
    starts[0, 5] = starts[0, 6] = starts[1, 0] = starts[1, 9] = True  # a 1-token document at 5; a start at t = 0
    h, result = newton_solve(cell, x, h0, weights, method=method, document_starts=starts)
    assert result.converged and not result.fell_back
    torch.testing.assert_close(h, sequential_solve(cell, x, h0, weights, starts), rtol=0, atol=1e-10)
    empty = cell.restart(h0[:1], torch.tensor(True))
    for row, start, stop in ((0, 0, 5), (0, 5, 6), (0, 6, 14), (1, 0, 9), (1, 9, 14)):
        first = h0[row:row + 1] if (row, start) == (0, 0) else empty
        alone = newton_solve(cell, x[row:row + 1, start:stop], first, weights, method=method)[0][0]
        torch.testing.assert_close(h[row, start:stop], alone, rtol=0, atol=1e-10)
    leaves = [t.clone().requires_grad_() for t in (x, h0, *weights)]
    got = torch.autograd.grad(newton_solve(cell, leaves[0], leaves[1], tuple(leaves[2:]), method=method,
                                           document_starts=starts)[0].square().sum(), leaves)
    want = torch.autograd.grad(sequential_solve(cell, leaves[0], leaves[1], tuple(leaves[2:]),
                                                starts).square().sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)
    assert got[1][1].abs().max() == 0  # the second row starts a document at t = 0: h0 does not matter
    assert got[1][0].abs().max() > 0


def _slstm_newton_run(time_inputs, shared, state, starts):
    from revival.ops import slstm

    return slstm(time_inputs[0], shared[0], state, impl="newton", document_starts=starts)


@pytest.mark.parametrize("with_state", [False, True])
def test_slstm_op_newton_packed_equals_separate(with_state):
    """Packed rows (1-token documents, starts at t = 0 and on chunk edges) == separate calls: outputs, every
    document's final state, gradients of x, R and the initial state; and the outputs equal the reference's."""
    from revival.ops import slstm
    from revival.ops._documents import from_lengths
    from tests.ops.test_varlen import LAYOUTS, T, check_packed

    g = torch.Generator().manual_seed(7)
    B, H, d = len(LAYOUTS), 2, 3
    x = torch.randn(B, T, 4, H, d, generator=g, dtype=F64) * 2
    R = torch.randn(4, H, d, d, generator=g, dtype=F64) * 0.5
    state = None
    if with_state:
        state = (torch.randn(B, H, d, generator=g, dtype=F64), torch.rand(B, H, d, generator=g, dtype=F64) + 0.5,
                 torch.randn(B, H, d, generator=g, dtype=F64), torch.randn(B, H, d, generator=g, dtype=F64))
    check_packed(_slstm_newton_run, [x], [1], [R], 1, initial_state=state)
    starts = from_lengths(LAYOUTS)
    if with_state:
        starts[:, 0] = False
    torch.testing.assert_close(slstm(x, R, state, impl="newton", document_starts=starts)[0],
                               slstm(x, R, state, impl="reference", document_starts=starts)[0], rtol=0, atol=1e-10)
