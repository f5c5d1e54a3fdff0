"""Triton kernels of revival.ops.newton against their PyTorch references: the diagonal and 2 x 2 block scans (both
directions, several time tiles), and the fused ParaGRU / ParaLSTM Newton steps (bf16 pre-activations, float32
states). Without CUDA they run under TRITON_INTERPRET=1 at tiny shapes (set before triton is imported)."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.ops.newton import PARAGRU, PARALSTM, linear_scan, linear_scan_reference  # noqa: E402
from revival.ops.newton.solver import _shift  # noqa: E402
from revival.ops.newton.triton import (  # noqa: E402
    available,
    block2_scan_triton,
    diagonal_scan_triton,
    paragru_newton_step_triton,
    paralstm_newton_step_triton,
)

DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not available(), reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
T = 37  # two time tiles of 32


def _randn(*shape, seed, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(DEVICE)


@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_scan(reverse):
    a = _randn(1, T, 3, 5, seed=0).tanh() * 1.1
    b = _randn(1, T, 3, 5, seed=1)
    got = diagonal_scan_triton(a.bfloat16(), b, reverse=reverse)  # bf16 coefficients read as float32
    want = linear_scan_reference(a.bfloat16().double(), b.double(), structure="diagonal", reverse=reverse)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True])
def test_block2_scan(reverse):
    A = _randn(1, T, 6, 2, 2, seed=2, scale=0.6)
    b = _randn(1, T, 6, 2, seed=3)
    got = block2_scan_triton(A, b, reverse=reverse)
    want = linear_scan_reference(A.double(), b.double(), structure="block", reverse=reverse)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_paragru_fused_newton_step():
    N = 6
    x, a = _randn(1, T, 3, N, seed=4).bfloat16(), _randn(3, N, seed=5)
    h, h0 = _randn(1, T, N, seed=6, scale=0.5), _randn(1, N, seed=7, scale=0.5)
    got, residual = paragru_newton_step_triton(x, h, h0, a)
    value, jac = PARAGRU.jacobian(_shift(PARAGRU, h, h0), x.float(), a)
    want = h + linear_scan(jac, value - h, structure="diagonal")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert residual == pytest.approx(float(((value - h).abs() / (1 + h.abs())).max()), rel=1e-5)


def test_paralstm_fused_newton_step():
    N = 6
    x, a, p = _randn(1, T, 3, N, seed=8).bfloat16(), _randn(3, N, seed=9), _randn(2, N, seed=10)
    h, h0 = _randn(1, T, N, 2, seed=11, scale=0.5), _randn(1, N, 2, seed=12, scale=0.5)
    got, residual = paralstm_newton_step_triton(x, h, h0, a, p)
    value, jac = PARALSTM.jacobian(_shift(PARALSTM, h, h0), x.float(), a, p)
    want = h + linear_scan(jac, value - h, structure="block")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert residual == pytest.approx(float(((value - h).abs() / (1 + h.abs())).max()), rel=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="the solver dispatches to the kernels for CUDA tensors only")
def test_solver_on_gpu_matches_cpu_float64():
    from revival.ops.newton import newton_solve, sequential_solve

    for cell, state_tail, weights in ((PARAGRU, (), (_randn(3, 16, seed=13),)),
                                      (PARALSTM, (2,), (_randn(3, 16, seed=14), _randn(2, 16, seed=15)))):
        x = _randn(2, 300, 3, 16, seed=16)
        h0 = torch.zeros(2, 16, *state_tail, device=DEVICE)
        h, result = newton_solve(cell, x, h0, weights)
        want = sequential_solve(cell, x.double(), h0.double(), tuple(w.double() for w in weights))
        assert result.converged
        torch.testing.assert_close(h.double(), want, rtol=0, atol=1e-4)
