"""Helpers shared by the Triton kernel tests (delta rule, SSD): errors against float64, gradients of a weighted loss,
the packed-documents case, the dispatch check. Importing it skips the importing test module when `triton` is not
installed (TRITON_INTERPRET is chosen in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm().clamp_min(1e-30)).item()


def run_weighted(fn, inputs, weights, device, dtype=None, low=()):
    """Outputs and gradients of sum(out * w_out) + sum(state * w_state); the inputs at indices `low` in `dtype`
    (None: every input as given)."""
    leaves = []
    for index, x in enumerate(inputs):
        x = x.to(device)
        if dtype is not None and index in low:
            x = x.to(dtype)
        leaves.append(x.detach().clone().requires_grad_(True))
    out, state = fn(*leaves)
    loss = (out.double() * weights[0].to(device)).sum() + (state.double() * weights[1].to(device)).sum()
    loss.backward()
    return [out.detach(), state.detach()] + [x.grad for x in leaves]


def assert_close(got, ref, names, tol):
    errors = {name: rel(g, r) for name, g, r in zip(names, got, ref)}
    assert max(errors.values()) < tol, errors


def packed_starts() -> torch.Tensor:
    """Two rows of 40 tokens: starts at t = 0, twice in a row, on chunk boundaries (16, 32) and at the last token;
    the second row has one start inside a chunk."""
    starts = torch.zeros(2, 40, dtype=torch.bool)
    starts[0, [0, 5, 6, 16, 32, 39]] = True
    starts[1, 21] = True
    return starts


def check_packed_documents(reference, kernel, inputs, weights, names):
    """`kernel(*inputs, document_starts=...)` against `reference` in float64 on the `packed_starts()` rows: outputs,
    final state and every gradient within 1e-5, but row 0 of dstate0 (the last gradient) is zero: it starts at t = 0."""
    starts = packed_starts()
    ref = run_weighted(lambda *a: reference(*a, document_starts=starts), [x.double() for x in inputs], weights, "cpu")
    got = run_weighted(lambda *a: kernel(*a, document_starts=starts.to(DEVICE)), inputs, weights, DEVICE)
    errors = {name: rel(g, r) for name, g, r in zip(names, got, ref)}
    errors[names[-1]] = rel(got[-1][1], ref[-1][1])
    assert got[-1][0].abs().max() == 0
    assert max(errors.values()) < 1e-5, errors


def check_dispatch(op, full, one_token):
    """impl='triton' through the public `op` equals impl='chunkwise': on the inputs `full` (chunk 16, also with a
    document start at t = 7), on the one-token inputs `one_token` without gradients (the step kernel; also as a
    one-token document, from a zero state); a bad impl is named. The last input of each is the initial state."""
    def assert_same(got, want):
        assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5

    assert_same(op(*full, chunk_size=16, impl="triton"), op(*full, chunk_size=16, impl="chunkwise"))
    with torch.no_grad():
        assert_same(op(*one_token, impl="triton"), op(*one_token, impl="chunkwise"))
    starts = torch.zeros(1, full[0].shape[1], dtype=torch.bool, device=DEVICE)
    starts[0, 7] = True
    assert_same(op(*full, chunk_size=16, impl="triton", document_starts=starts),
                op(*full, chunk_size=16, impl="chunkwise", document_starts=starts))
    with torch.no_grad():
        assert_same(op(*one_token, impl="triton", document_starts=starts[:, 7:8]),
                    op(*one_token[:-1], None, impl="chunkwise"))
    with pytest.raises(ValueError, match="impl.*'fast'"):
        op(*full, impl="fast")
