"""Mamba-3 SISO on the Triton SSD kernels (`revival/ops/mamba3/triton.py`) against the float64 reference loop, at
small shapes under the CPU interpreter without CUDA: outputs, the whole final state and the gradients of every input
and of the initial state; 16-bit rounding at a real shape on the GPU (bottom) and in benchmarks/gpu_siblings.py."""

from __future__ import annotations

import pytest
import torch

from revival.ops.mamba3 import mamba3, mamba3_reference
from revival.ops.mamba3.triton import mamba3_step_triton, mamba3_triton
from tests.ops._triton_helpers import DEVICE, assert_close, packed_starts, rel, run_weighted

NAMES = ("y", "state", "dx", "ddt", "dA", "dlam", "dB", "dC", "dtheta", "dD", "dangle0", "dssm0", "dprev_B0",
         "dprev_x0")
LOW = (0, 4, 5)  # x, B, C: the inputs given in the 16-bit dtype


def _inputs(n, T, H, P, N, seed, dt_scale=0.5):
    """The op's inputs then the four parts of the initial state, and the loss weights of y and of the final state
    (its four parts flattened and concatenated)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, H, 1, P, generator=gen)
    dt = torch.rand(n, T, H, generator=gen) * dt_scale + 0.01
    A = -torch.rand(H, generator=gen) * 2 - 0.1
    lam = torch.rand(n, T, H, generator=gen)
    B, C = torch.randn(n, T, H, 1, N, generator=gen), torch.randn(n, T, H, 1, N, generator=gen)
    theta = torch.randn(n, T, H, N // 2, generator=gen) * 2
    D = torch.randn(H, generator=gen)
    state = [torch.randn(n, H, N // 2, generator=gen), torch.randn(n, H, P, N, generator=gen),
             torch.randn(n, H, 1, N, generator=gen), torch.randn(n, H, 1, P, generator=gen)]
    size = H * (N // 2 + P * N + N + P)
    weights = (torch.randn(n, T, H, 1, P, generator=gen).double(), torch.randn(n, size, generator=gen).double())
    return [x, dt, A, lam, B, C, theta, D, *state], weights


def _flat(op, **options):
    """op(*inputs, *state) -> (y, the final state's four parts flattened into one (n, size) tensor)."""
    def fn(*a):
        y, state = op(*a[:8], state=tuple(a[8:]), **options)
        return y, torch.cat([part.flatten(1) for part in state], dim=1)
    return fn


def _run(op, inputs, weights, device, dtype=None, **options):
    return run_weighted(_flat(op, **options), inputs, weights, device, dtype, LOW)


def _reference(inputs, weights, **options):
    return _run(mamba3_reference, [t.double() for t in inputs], weights, "cpu", **options)


CASES = [
    # n, T, H, P, N, chunk
    (1, 1, 2, 16, 16, 16),  # one token, with gradients: the chunk kernels
    (2, 37, 2, 16, 32, 16),  # odd T, tail chunk
    (1, 45, 3, 24, 20, 16),  # P and N not powers of two
    (1, 9, 1, 16, 16, 64),  # one partial chunk
]


@pytest.mark.parametrize("n,T,H,P,N,chunk", CASES)
def test_forward_backward_match_float64_reference(n, T, H, P, N, chunk):
    inputs, weights = _inputs(n, T, H, P, N, seed=T + P + N)
    ref = _reference(inputs, weights)
    got = _run(mamba3_triton, inputs, weights, DEVICE, chunk_size=chunk)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got, ref, NAMES, 1e-5)


def test_bfloat16_inputs():
    inputs, weights = _inputs(1, 40, 2, 16, 32, seed=5)
    ref = _reference([t.bfloat16() if i in LOW else t for i, t in enumerate(inputs)], weights)
    got = _run(mamba3_triton, inputs, weights, DEVICE, dtype=torch.bfloat16, chunk_size=16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_close(got, ref, NAMES, 1e-2)


def test_document_starts_match_reference():
    """Starts at t = 0, twice in a row (a one-token document), on chunk edges (16, 32) and at the last token; the
    second row one start inside a chunk. Row 0 starts at t = 0: its initial state gets no gradient."""
    inputs, weights = _inputs(2, 40, 2, 16, 24, seed=13)
    starts = packed_starts()
    ref = _reference(inputs, weights, document_starts=starts)
    got = _run(mamba3_triton, inputs, weights, DEVICE, chunk_size=16, document_starts=starts.to(DEVICE))
    for grad in got[-4:]:
        assert grad[0].abs().max() == 0
    assert_close(got[:-4] + [g[1] for g in got[-4:]], ref[:-4] + [r[1] for r in ref[-4:]], NAMES, 1e-5)


def test_state_carry_equals_one_pass():
    inputs, _ = _inputs(1, 40, 2, 16, 16, seed=1)
    inputs = [t.to(DEVICE) for t in inputs]
    per_token = [t.shape[:2] == (1, 40) for t in inputs[:8]]

    def part(a, b):
        return [t[:, a:b] if timed else t for t, timed in zip(inputs[:8], per_token)]

    y_full, s_full = mamba3_triton(*inputs[:8], tuple(inputs[8:]), chunk_size=16)
    y1, s = mamba3_triton(*part(0, 23), tuple(inputs[8:]), chunk_size=16)
    y2, s = mamba3_triton(*part(23, 40), s, chunk_size=16)
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-5
    assert all(rel(a, b) < 1e-5 for a, b in zip(s, s_full))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_D,start", [(True, False), (False, True)])
def test_step_matches_reference(dtype, tol, with_D, start):
    """One token on SSD's step kernel from a given state (or a document start at the token: the state is dropped)."""
    inputs, _ = _inputs(2, 1, 3, 24, 20, seed=7)
    inputs = [t.to(dtype) if i in LOW else t for i, t in enumerate(inputs)]
    if not with_D:
        inputs[7] = None
    starts = torch.tensor([[start], [False]])
    ref = mamba3_reference(*(None if t is None else t.double() for t in inputs[:8]),
                           state=tuple(t.double() for t in inputs[8:]), document_starts=starts)
    got = mamba3_step_triton(*(None if t is None else t.to(DEVICE) for t in inputs[:8]),
                             tuple(t.to(DEVICE) for t in inputs[8:]), document_starts=starts.to(DEVICE))
    assert got[0].dtype == dtype and got[1][1].dtype == torch.float32
    assert rel(got[0], ref[0]) < tol
    assert all(rel(a, b) < tol for a, b in zip(got[1], ref[1]))


def test_dispatch():
    """impl='triton' through the public op equals 'chunkwise' (T = 20 and one token without gradients, the step
    kernel); 'auto' off CUDA is chunkwise; MIMO, float64 and a bad impl are refused with the argument named."""
    inputs, _ = _inputs(1, 20, 2, 16, 16, seed=3)
    x = [t.to(DEVICE) for t in inputs]
    one = [t[:, :1] if t.ndim > 1 and t.shape[1] == 20 else t for t in x[:8]]
    for args in (x[:8], one):
        with torch.no_grad():
            got = mamba3(*args, state=tuple(x[8:]), chunk_size=16, impl="triton")
            want = mamba3(*args, state=tuple(x[8:]), chunk_size=16, impl="chunkwise")
        assert rel(got[0], want[0]) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(got[1], want[1]))
    if DEVICE == "cpu":
        y_auto, _ = mamba3(*x[:8], state=tuple(x[8:]), chunk_size=16)
        y_chunkwise, _ = mamba3(*x[:8], state=tuple(x[8:]), chunk_size=16, impl="chunkwise")
        assert torch.equal(y_auto, y_chunkwise)
    mimo = [x[0].expand(-1, -1, -1, 2, -1), *x[1:4], x[4].expand(-1, -1, -1, 2, -1), x[5].expand(-1, -1, -1, 2, -1),
            *x[6:8]]
    with pytest.raises(ValueError, match=r"x: impl='triton' runs SISO.*R = 2"):
        mamba3(*mimo, impl="triton")
    with pytest.raises(ValueError, match="float64"):
        mamba3(*(t.double() for t in x[:8]), impl="triton")
    with pytest.raises(ValueError, match="impl.*'fast'"):
        mamba3(*x[:8], impl="fast")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: checks bfloat16 on the GPU kernels at a real shape")
def test_bfloat16_at_a_real_shape_on_the_gpu():
    """bfloat16 x, B, C at (2, 2048, 8, P=64, N=128) with packed documents: y, the final state and every gradient
    within 2e-2 of float64 (the chunkwise path on the GPU, itself tested equal to the loop)."""
    inputs, weights = _inputs(2, 2048, 8, 64, 128, seed=11, dt_scale=0.1)
    starts = torch.rand(2, 2048, generator=torch.Generator().manual_seed(12)) < 1 / 500
    starts[1, 0] = True
    rounded = [t.bfloat16() if i in LOW else t for i, t in enumerate(inputs)]
    ref = run_weighted(_flat(mamba3, impl="chunkwise", document_starts=starts.cuda()),
                       [t.double() for t in rounded], weights, "cuda")
    got = _run(mamba3, inputs, weights, "cuda", dtype=torch.bfloat16, impl="triton", document_starts=starts.cuda())
    assert_close(got[:-4] + [g[0] for g in got[-4:]], ref[:-4] + [r[0] for r in ref[-4:]], NAMES, 2e-2)
