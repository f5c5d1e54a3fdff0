"""Triton SSD (Mamba-2) kernels against the float64 reference loop, at small shapes under the CPU interpreter
without CUDA; 16-bit rounding is checked at a real shape on the GPU (bottom) and in benchmarks/gpu_siblings.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from revival.ops.ssd import ssd, ssd_reference
from revival.ops.ssd.triton import LaunchConfig, kernel_chunk_size, ssd_step_triton, ssd_triton
from tests.ops._triton_helpers import DEVICE, assert_close, check_dispatch, check_packed_documents, rel, run_weighted

NAMES = ("y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dstate0")
LOW = (0, 3, 4)  # x, B, C: the inputs given in the 16-bit dtype


def _inputs(n, T, H, P, G, N, seed, dt_scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, H, P, generator=gen)
    dt = torch.rand(n, T, H, generator=gen) * dt_scale
    A = -torch.rand(H, generator=gen) * 2 - 0.1
    B, C = torch.randn(n, T, G, N, generator=gen), torch.randn(n, T, G, N, generator=gen)
    D = torch.randn(H, generator=gen)
    state = torch.randn(n, H, P, N, generator=gen)
    weights = (torch.randn(n, T, H, P, generator=gen).double(), torch.randn(n, H, P, N, generator=gen).double())
    return [x, dt, A, B, C, D, state], weights


_run = partial(run_weighted, low=LOW)


def _reference(inputs, weights, device="cpu"):
    return _run(ssd_reference, [t.double() for t in inputs], weights, device)


CASES = [
    # n, T, H, P, G, N, chunk
    (1, 37, 2, 16, 1, 32, 16),  # tail chunk
    (2, 45, 4, 24, 2, 20, 16),  # groups, P and N not powers of two
    (1, 20, 2, 48, 2, 16, 16),  # P over several state tiles of the sequential kernels
    (1, 9, 1, 16, 1, 16, 64),  # one partial chunk
    (1, 30, 2, 16, 1, 40, 16),  # three N-tiles of the dB / dC kernels, the last one partial
]


@pytest.mark.parametrize("n,T,H,P,G,N,chunk", CASES)
def test_forward_backward_match_float64_reference(n, T, H, P, G, N, chunk):
    inputs, weights = _inputs(n, T, H, P, G, N, seed=T + P + N)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(block_p_states=16, block_p_dstates=16, block_p_dx=16,  # several tiles even at small P
                          block_p_grads=16, block_n_grads=16)
    got = _run(lambda *a: ssd_triton(*a, chunk_size=chunk, launch=launch), inputs, weights, DEVICE)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got, ref, NAMES, 1e-5)


def test_bfloat16_inputs():
    inputs, weights = _inputs(1, 40, 2, 16, 1, 32, seed=5)
    ref = _reference([t.bfloat16() if i in LOW else t for i, t in enumerate(inputs)], weights)
    got = _run(lambda *a: ssd_triton(*a, chunk_size=16), inputs, weights, DEVICE, dtype=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_close(got, ref, NAMES, 1e-2)


def test_strong_decay_without_skip_and_state():
    """dt A down to -40 per step and no D, no initial state."""
    inputs, weights = _inputs(1, 33, 2, 16, 1, 16, seed=9, dt_scale=20.0)
    ref = ssd_reference(*(t.double() for t in inputs[:5]))
    y, state = ssd_triton(*(t.to(DEVICE) for t in inputs[:5]), chunk_size=16)
    assert rel(y, ref[0]) < 1e-5 and rel(state, ref[1]) < 1e-5


def test_state_carry_equals_one_pass():
    inputs, _ = _inputs(1, 40, 2, 16, 1, 16, seed=1)
    x, dt, A, B, C, D, S = (t.to(DEVICE) for t in inputs)
    y_full, s_full = ssd_triton(x, dt, A, B, C, D, S, chunk_size=16)
    y1, s = ssd_triton(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], D, S, chunk_size=16)
    y2, s = ssd_triton(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], D, s, chunk_size=16)
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-5 and rel(s, s_full) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_D", [True, False])
def test_step_matches_reference(dtype, tol, with_D):
    inputs, _ = _inputs(2, 1, 4, 24, 2, 20, seed=7)
    x, dt, A, B, C, D, S = inputs
    D = D if with_D else None
    x, B, C = x.to(dtype), B.to(dtype), C.to(dtype)
    y_ref, s_ref = ssd_reference(*(t.double() for t in (x, dt, A, B, C)), None if D is None else D.double(),
                                 S.double())
    y, s = ssd_step_triton(*(t.to(DEVICE) for t in (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])),
                           None if D is None else D.to(DEVICE), S.to(DEVICE))
    assert y.dtype == dtype and s.dtype == torch.float32
    assert rel(y, y_ref[:, 0]) < tol and rel(s, s_ref) < tol


def test_kernel_chunk_size():
    assert [kernel_chunk_size(c) for c in (1, 16, 30, 64, 256)] == [16, 16, 32, 64, 64]


def test_inputs_outside_the_kernels_limits_are_named():
    """float64 x and a head dim over 256 (tiles held whole on chip): ValueErrors naming the arguments, before any
    kernel runs."""
    x, dt, A, B, C, D, state = _inputs(1, 4, 1, 16, 1, 16, seed=5)[0]
    with pytest.raises(ValueError, match=r"^x: impl='triton' supports float32/bfloat16/float16 inputs, got float64"):
        ssd_triton(x.double(), dt, A, B, C, D, state)
    wide = torch.randn(1, 4, 1, 300)
    with pytest.raises(ValueError, match=r"^x, B: impl='triton' supports head dims and state sizes up to 256, "
                                         r"got P=300, N=16$"):
        ssd_triton(wide, dt, A, B, C, D, None)


def test_document_starts_match_reference():
    """Packed documents: starts at t = 0, twice in a row, on a chunk boundary (16, 32) and at the last token; the
    second row has one start inside a chunk. Outputs, final state and every gradient against float64."""
    inputs, weights = _inputs(2, 40, 4, 16, 2, 24, seed=13)
    check_packed_documents(ssd_reference, partial(ssd_triton, chunk_size=16), inputs, weights, NAMES)


def test_dispatch():
    """impl='triton' through the public op (also with document starts, and one token without gradients through the
    step kernel), and a bad impl named."""
    inputs, _ = _inputs(1, 20, 2, 16, 1, 16, seed=3)
    x = [t.to(DEVICE) for t in inputs]
    one = [x[0][:, :1], x[1][:, :1], x[2], x[3][:, :1], x[4][:, :1], x[5], x[6]]
    check_dispatch(ssd, x, one)


@pytest.mark.slow
def test_gradient_kernels_compile_for_sm90_at_four_programs_per_sm(tmp_path):
    """_dc_kernel and _db_kernel compiled for sm_90 on this machine (no GPU) at the 125M shape (P 64, N 128, bf16)
    with the launch defaults: four programs per SM and spills under 1 KB per thread (the defaults were chosen by
    H200 time, ~700 bytes spilled; a change that spills more is a change to re-time). About 10 s of compiling."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    probe = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "ssd_compile_probe.py")
    done = subprocess.run([sys.executable, probe, "--cases", "tf32:64x128", "--kernels", "dc,db", "--out",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "ssd_compile.json").read_text())["results"]
    got = {row["kernel"]: (row["spill_store_bytes"], row["occupancy"]["programs_per_sm"]) for row in rows}
    assert set(got) == {"dc", "db"} and all(spills < 1024 and programs == 4 for spills, programs in got.values()), got


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: checks the kernels' bfloat16 gradients on the GPU (Hopper)")
def test_gradients_at_a_real_shape_on_the_gpu():
    """bfloat16 at (2, 1024, 8, P=64, G=1, N=128), every gradient within 2e-2 of float64 (the reference loop on the
    GPU); the kernels never transpose a matrix-unit result (fla #640), and this test would see a wrong one."""
    inputs, weights = _inputs(2, 1024, 8, 64, 1, 128, seed=11, dt_scale=0.1)
    rounded = [t.bfloat16() if i in LOW else t for i, t in enumerate(inputs)]
    ref = _reference(rounded, weights, "cuda")
    got = _run(ssd_triton, inputs, weights, "cuda", dtype=torch.bfloat16)
    assert_close(got, ref, NAMES, 2e-2)
