"""Packed rows on the Triton mLSTM kernels: the kernels take document starts as gate and key values at the starts
(revival/ops/mlstm/resets.py). That algebra is checked in float64 on the chunkwise form (packed == separate calls:
outputs, final states, gradients), then the kernels themselves (TRITON_INTERPRET=1 on CPU, tiny shapes) against the
float64 chunkwise form with document starts."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")

from revival.ops._documents import from_lengths  # noqa: E402
from revival.ops.mlstm import mlstm  # noqa: E402
from revival.ops.mlstm.resets import resets_as_gates  # noqa: E402
from tests.ops.test_varlen import _mlstm_inputs, _mlstm_state, check_packed  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"


def _as_gates_run(time_inputs, shared, state, starts):
    q, k, v, i, f = time_inputs
    if state is None:
        state = tuple(torch.zeros(q.shape[0], q.shape[1], *shape, dtype=q.dtype)
                      for shape in ((q.shape[-1], v.shape[-1]), (q.shape[-1],), ()))
    if starts is not None:
        k, i, f, state = resets_as_gates(k, i, f, state, starts)
    return mlstm(q, k, v, i, f, tuple(state), impl="chunkwise", chunk_size=8)


def test_resets_as_gates_equal_separate_calls_in_float64():
    check_packed(_as_gates_run, _mlstm_inputs(), [2] * 5, [], 2, atol=1e-9)
    check_packed(_as_gates_run, _mlstm_inputs(seed=5), [2] * 5, [], 2, initial_state=_mlstm_state(), atol=1e-9)


LAYOUTS = [[1, 15, 16, 1, 7], [5, 1, 1, 9, 24]]  # T = 40, kernel chunk 16: starts on the chunk edges 16 and 32


@pytest.mark.parametrize("initial_state", [False, True])
def test_triton_packed_rows_match_float64_chunkwise(initial_state):
    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")
    from revival.ops.mlstm.triton import available

    if not available():
        pytest.skip("Triton cannot run here")
    B, H, T, Dk, Dv = 2, 1, 40, 16, 16
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(B, H, T, d, generator=g) for d in (Dk, Dk, Dv)]
    inputs += [torch.randn(B, H, T, generator=g), torch.randn(B, H, T, generator=g) + 2.0]
    state = [torch.randn(B, H, Dk, Dv, generator=g), torch.randn(B, H, Dk, generator=g).abs(),
             torch.randn(B, H, generator=g)] if initial_state else []
    starts = from_lengths(LAYOUTS)
    if initial_state:
        starts[0, 0] = False  # row 0's first document continues the state; row 1's drops it
    weights = [torch.randn(B, H, T, Dv, generator=g, dtype=torch.float64), torch.randn(B, H, Dk, Dv, generator=g,
               dtype=torch.float64), torch.randn(B, H, Dk, generator=g, dtype=torch.float64),
               torch.randn(B, H, generator=g, dtype=torch.float64)]

    def run(impl, dtype, device):
        xs = [x.to(device=device, dtype=dtype).clone().requires_grad_(True) for x in inputs + state]
        h, final = mlstm(*xs[:5], tuple(xs[5:]) if initial_state else None, impl=impl, chunk_size=16,
                         document_starts=starts.to(device))
        outs = [h, *final]
        loss = sum((o.double().cpu() * w).sum() for o, w in zip(outs, weights))
        loss.backward()
        return [o.detach().double().cpu() for o in outs] + [x.grad.double().cpu() for x in xs]

    expected = run("chunkwise", torch.float64, "cpu")
    got = run("triton", torch.float32, DEVICE)
    # measured: 6e-6 to 4e-5 (plain rows: 2e-7 to 4e-6): the chunk's cumulative log-forget passes through -64 per
    # start in float32 (resets.py). The stabilizer's zero-state term is checked in float64 above (1e-9).
    # A gradient that is exactly 0 in float64 (the initial n of a row whose first document is one token) comes out
    # ~1e-28: the previous state's weight exp(-64 + ...) at a start.
    for index, (a, b) in enumerate(zip(got, expected)):
        error = (a - b).norm().item()
        assert torch.isfinite(a).all() and error <= 1e-4 * b.norm().item() + 1e-20, (index, error, b.norm().item())


# ------------------------------------------------------------------------------- minGRU / minLSTM scan kernel
def _scan_inputs(names, B=2, T=40, D=8, seed=21):
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in names]


def _scan(kind):
    from revival.ops import mingru_scan, minlstm_scan

    return mingru_scan if kind == "mingru" else minlstm_scan


def _scan_as_inputs(kind, inputs, h0, starts):
    """The kernel's inputs for packed rows (linear_scan._resets_as_inputs), as the triton branch builds them."""
    from revival.ops.linear_scan import RESET_GATE, _resets_as_inputs, mingru_log_terms, minlstm_log_terms

    if kind == "mingru":
        gate, hidden = inputs
        _, log_b = mingru_log_terms(gate, hidden)
        (gate,), hidden, h0 = _resets_as_inputs([gate], hidden, log_b, h0, starts, [RESET_GATE])
        return [gate, hidden], h0
    forget, input, hidden = inputs
    _, log_b = minlstm_log_terms(forget, input, hidden)
    (forget, input), hidden, h0 = _resets_as_inputs([forget, input], hidden, log_b, h0, starts,
                                                    [-RESET_GATE, RESET_GATE])
    return [forget, input, hidden], h0


@pytest.mark.parametrize("kind", ["mingru", "minlstm"])
def test_scan_resets_as_inputs_equal_separate_calls_in_float64(kind):
    def run(time_inputs, shared, state, starts):
        if starts is not None:
            time_inputs, state = _scan_as_inputs(kind, time_inputs, state, starts)
        return _scan(kind)(*time_inputs, state, impl="chunked", chunk_size=8)
    names = ["gate", "hidden"] if kind == "mingru" else ["forget", "input", "hidden"]
    inputs = _scan_inputs(names, B=3, T=27)
    check_packed(run, inputs, [1] * len(names), [], 1, atol=1e-9)
    h0 = torch.randn(len(inputs[0]), 8, dtype=torch.float64)
    check_packed(run, inputs, [1] * len(names), [], 1, initial_state=h0, atol=1e-9)


@pytest.mark.parametrize("kind", ["mingru", "minlstm"])
def test_triton_scan_packed_rows_match_float64_chunked(kind):
    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")
    from revival.ops.linear_scan.triton import available

    if not available():
        pytest.skip("Triton cannot run here")
    names = ["gate", "hidden"] if kind == "mingru" else ["forget", "input", "hidden"]
    inputs = _scan_inputs(names)
    h0 = torch.randn(2, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    starts = from_lengths(LAYOUTS)
    starts[0, 0] = False  # row 0 continues h0, row 1 drops it
    weights = [torch.randn(2, 40, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)]

    def run(impl, dtype, device):
        xs = [x.to(device=device, dtype=dtype).clone().requires_grad_(True) for x in inputs + [h0]]
        h, h_last = _scan(kind)(*xs[:-1], xs[-1], impl=impl, chunk_size=8, document_starts=starts.to(device))
        loss = (h.double().cpu() * weights[0]).sum() + (h_last.double().cpu() * weights[1]).sum()
        loss.backward()
        return [h.detach().double().cpu(), h_last.detach().double().cpu()] + [x.grad.double().cpu() for x in xs]

    expected = run("chunked", torch.float64, "cpu")
    got = run("triton", torch.float32, DEVICE)
    for index, (a, b) in enumerate(zip(got, expected)):
        error = (a - b).norm().item()
        assert torch.isfinite(a).all() and error <= 1e-5 * b.norm().item() + 1e-12, (index, error, b.norm().item())


# ---------------------------------------------------------------------------------------------------------- sLSTM
SLSTM_LAYOUTS = [[1, 3, 1, 4], [2, 1, 6], [9]]  # 1-token documents, starts in a row; the kernel walks T = 9 steps


def _slstm_triton(x, R, state, starts, weights, **launch):
    """slstm_triton on float32 copies on DEVICE (a zero state for None); float64 CPU results."""
    from revival.ops.slstm.triton import LaunchConfig, slstm_triton

    to32 = dict(device=DEVICE, dtype=torch.float32)
    B, _, _, H, d = x.shape
    state = [torch.zeros(B, H, d, **to32)] * 4 if state is None else [s.to(**to32) for s in state]
    y, final = slstm_triton(x.to(**to32), R.to(**to32), state, launch=LaunchConfig(weights=weights, **launch),
                            document_starts=None if starts is None else starts.to(DEVICE))
    return y.cpu().double(), tuple(s.cpu().double() for s in final)


def _slstm_packed_inputs(B=3, T=9, H=2, d=3, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = 2.0 * torch.randn(B, T, 4, H, d, generator=g, dtype=torch.float64)
    R = 0.5 * torch.randn(4, H, d, d, generator=g, dtype=torch.float64)
    state = (torch.randn(B, H, d, generator=g, dtype=torch.float64),
             torch.rand(B, H, d, generator=g, dtype=torch.float64) + 0.5,
             torch.randn(B, H, d, generator=g, dtype=torch.float64),
             torch.randn(B, H, d, generator=g, dtype=torch.float64))
    return x, R, state


def _triton_or_skip():
    pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")
    from revival.ops.slstm.triton import available

    if not available():
        pytest.skip("Triton cannot run here")


def test_slstm_triton_packed_equals_separate_triton_calls():
    """Packed rows on the kernels equal the kernels on each document alone (each row's first document continuing
    the initial state): outputs, every document's final state, gradients of x, R and the initial state. float32:
    measured 3e-7 at most (the weight gradient sums over the documents in another order)."""
    _triton_or_skip()
    x, R, state = _slstm_packed_inputs()

    def run(time_inputs, shared, state, starts):
        return _slstm_triton(time_inputs[0], shared[0], state, starts, "resident")

    check_packed(run, [x], [1], [R], 1, layouts=SLSTM_LAYOUTS, initial_state=state, atol=1e-5)


@pytest.mark.parametrize("weights", ["resident", "streamed", "split"])
def test_slstm_triton_packed_matches_float64_reference(weights):
    """Every weight mode with starts against the float64 reference loop with the same starts (which equals
    separate calls, tests/ops/test_varlen.py); row 0 continues the initial state, the others drop it at t = 0.
    split: d = 20 over two programs of 16 units."""
    _triton_or_skip()
    from revival.ops.slstm import slstm

    x, R, state = _slstm_packed_inputs(d=20 if weights == "split" else 3, seed=13)
    starts = from_lengths(SLSTM_LAYOUTS)
    starts[0, 0] = False
    g = torch.Generator().manual_seed(14)
    weights_y = torch.randn(x.shape[0], x.shape[1], *x.shape[3:], generator=g, dtype=torch.float64)
    weights_state = [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in state]

    def run(run_fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, R, *state)]
        y, final = run_fn(leaves[0], leaves[1], tuple(leaves[2:]), starts)
        loss = (y * weights_y).sum() + sum((s * w).sum() for s, w in zip(final, weights_state))
        loss.backward()
        return [y.detach(), *(s.detach() for s in final)] + [t.grad for t in leaves]

    launch = {"split_units": 16} if weights == "split" else {}
    expected = run(lambda x, R, state, starts: slstm(x, R, state, impl="reference", document_starts=starts))
    got = run(lambda x, R, state, starts: _slstm_triton(x, R, state, starts, weights, **launch))
    for index, (a, b) in enumerate(zip(got, expected)):
        error = (a - b).norm().item()
        assert torch.isfinite(a).all() and error <= 1e-5 * b.norm().item() + 1e-12, (index, error, b.norm().item())


def test_slstm_auto_runs_packed_rows_like_plain_rows():
    from revival.ops.slstm import _resolve_impl, slstm

    x, R, _ = _slstm_packed_inputs()
    expected = "triton" if ON_GPU else "fused"
    assert _resolve_impl("auto", x.float().to(DEVICE)) == expected
    starts = from_lengths(SLSTM_LAYOUTS).to(DEVICE)
    y_auto, _ = slstm(x.float().to(DEVICE), R.float().to(DEVICE), impl="auto", document_starts=starts)
    y_explicit, _ = slstm(x.float().to(DEVICE), R.float().to(DEVICE), impl=expected, document_starts=starts)
    assert torch.equal(y_auto, y_explicit)
