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
