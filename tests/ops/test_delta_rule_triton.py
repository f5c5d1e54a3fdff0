"""Triton gated delta rule kernels against the float64 reference loop.

Without CUDA the kernels run under TRITON_INTERPRET=1 at small shapes (chosen in tests/conftest.py); the
interpreter computes the products in float32, so 16-bit rounding of the operands is checked on the GPU (the Hopper
test at the bottom and benchmarks/gpu_siblings.py)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from revival.ops.delta_rule import gated_delta_rule, gated_delta_rule_reference
from revival.ops.delta_rule.triton import (
    LaunchConfig,
    gated_delta_rule_step_triton,
    gated_delta_rule_triton,
    kernel_chunk_size,
    launch_config,
)
from tests.ops._triton_helpers import DEVICE, assert_close, check_dispatch, check_packed_documents, rel, run_weighted

LOW = (0, 1, 2)  # q, k, v: the inputs given in the 16-bit dtype
NAMES = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dstate0")


def _inputs(n, T, H, Dk, Dv, seed, beta_max=1.0, g_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, T, H, Dk, generator=gen)
    k = F.normalize(torch.randn(n, T, H, Dk, generator=gen), dim=-1)
    v = torch.randn(n, T, H, Dv, generator=gen)
    g = -torch.rand(n, T, H, generator=gen) * g_scale
    beta = torch.rand(n, T, H, generator=gen) * beta_max
    state = torch.randn(n, H, Dk, Dv, generator=gen)
    weights = (torch.randn(n, T, H, Dv, generator=gen).double(), torch.randn(n, H, Dk, Dv, generator=gen).double())
    return [q, k, v, g, beta, state], weights


_run = partial(run_weighted, low=LOW)


def _reference(inputs, weights):
    return _run(gated_delta_rule_reference, [x.double() for x in inputs], weights, "cpu")


CASES = [
    # n, T, H, Dk, Dv, chunk, beta_max
    (1, 37, 2, 16, 32, 16, 1.0),  # tail chunk, Dk != Dv
    (2, 45, 1, 24, 20, 16, 2.0),  # head dims that are not powers of two; beta up to 2 (negative eigenvalues)
    (1, 20, 1, 16, 80, 16, 1.0),  # Dv over several state tiles of the sequential kernels
    (1, 9, 2, 16, 16, 64, 1.0),  # one partial chunk
]


@pytest.mark.parametrize("n,T,H,Dk,Dv,chunk,beta_max", CASES)
def test_forward_backward_match_float64_reference(n, T, H, Dk, Dv, chunk, beta_max):
    inputs, weights = _inputs(n, T, H, Dk, Dv, seed=T + Dk + Dv, beta_max=beta_max)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(block_v_states=16, block_v_dstates=32, block_v_wy=16, block_v_grads=32)  # several tiles
    got = _run(lambda *a: gated_delta_rule_triton(*a, Dk**-0.5, chunk_size=chunk, launch=launch), inputs, weights,
               DEVICE)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_close(got, ref, NAMES, 1e-5)


def test_unpipelined_state_gradient_kernel_matches_float64_reference():
    """The state-gradient kernel unpipelined, at head dims that are not powers of two (masked reads), beta up to 2."""
    inputs, weights = _inputs(2, 45, 1, 24, 20, seed=89, beta_max=2.0)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(stages_dstates=1)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 24**-0.5, chunk_size=16, launch=launch), inputs, weights,
               DEVICE)
    assert_close(got, ref, NAMES, 1e-5)


def test_float32_launch_defaults_at_dk_128_fit_shared_memory():
    """float32 at Dk = 128 (three-pass tf32 keeps two copies of each product operand in shared memory): the
    state-gradient kernel runs unpipelined, the states / output kernels take narrower Dv-tiles; the split gradient
    kernels hold their inputs (96 KB on sm_90) at every dtype; bfloat16 and float32 at Dk = 64 keep the settings
    their speed was measured with (benchmarks/delta_rule_compile_probe.py measures the bytes)."""
    f32 = launch_config(128, 256, 64, torch.float32)
    assert (f32.stages_dstates, f32.block_v_states, f32.block_v_output) == (1, 32, 64)
    for Dk, dtype in ((128, torch.bfloat16), (128, torch.float16), (64, torch.float32)):
        cfg = launch_config(Dk, 128, 64, dtype)
        assert (cfg.stages_dstates, cfg.block_v_states, cfg.block_v_output) == (None, 64, 128)
    assert launch_config(128, 128, 64, torch.float32, LaunchConfig(stages_dstates=2)).stages_dstates == 2
    # few batch*heads (32k context, batch 1): narrower, 8-warp state-gradient walks
    few = launch_config(128, 256, 6, torch.bfloat16)
    assert (few.block_v_dstates, few.warps_dstates, launch_config(128, 256, 96, torch.bfloat16).warps_dstates) == (
        32, 8, 4)
    # the gradient kernels pipelined at 16-bit Dk <= 128 (measured faster at the 125M shape), not wider or float32
    stages = [launch_config(Dk, 256, 64, dtype).stages_grads for Dk, dtype in (
        (128, torch.bfloat16), (64, torch.float16), (256, torch.bfloat16), (128, torch.float32))]
    assert stages == [2, 2, 1, 1]


@pytest.mark.slow
def test_float32_kernels_at_dk_128_fit_sm90_shared_memory(tmp_path):
    """Every delta-rule kernel compiled for sm_90 on this machine (no GPU) at float32 (Dk, Dv) = (128, 128) with the
    launch defaults: shared memory under the H200's 232448 bytes with 16 KB to spare (the single gradient kernel
    asked for 262144 before it reloaded its inputs; split, each part holds them in 96 KB). About a minute of
    compilation."""
    import json
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    probe = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "delta_rule_compile_probe.py")
    done = subprocess.run([sys.executable, probe, "--cases", "tf32x3:128x128", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "delta_rule_compile.json").read_text())["results"]
    shared = {row["kernel"]: row["shared_bytes"] for row in rows}
    assert sorted(shared) == ["dstates", "grads_output", "grads_wy", "local_du", "output", "states", "wy"]
    assert max(shared.values()) <= 232448 - 16384, shared


def test_bfloat16_inputs():
    inputs, weights = _inputs(1, 40, 2, 16, 32, seed=5)
    ref = _reference([x.bfloat16().double() if i < 3 else x for i, x in enumerate(inputs)], weights)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 0.25, chunk_size=16), inputs, weights, DEVICE,
               dtype=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert_close(got, ref, NAMES, 1e-2)


def test_strong_decay_and_no_state():
    """g down to -30 (decays of 1e-13 inside a chunk) and the zero initial state (state=None)."""
    inputs, weights = _inputs(1, 33, 1, 16, 16, seed=9, g_scale=30.0)
    inputs[5] = torch.zeros_like(inputs[5])
    ref = _reference(inputs, weights)
    o, state = gated_delta_rule_triton(*(x.to(DEVICE) for x in inputs[:5]), None, 0.25, chunk_size=16)
    assert rel(o, ref[0]) < 1e-5 and rel(state, ref[1]) < 1e-5


def test_state_carry_equals_one_pass():
    inputs, _ = _inputs(1, 40, 2, 16, 16, seed=1)
    x = [t.to(DEVICE) for t in inputs]
    o_full, s_full = gated_delta_rule_triton(*x, 0.25, chunk_size=16)
    o1, s = gated_delta_rule_triton(*(t[:, :23] for t in x[:5]), x[5], 0.25, chunk_size=16)
    o2, s = gated_delta_rule_triton(*(t[:, 23:] for t in x[:5]), s, 0.25, chunk_size=16)
    assert rel(torch.cat([o1, o2], 1), o_full) < 1e-5 and rel(s, s_full) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_step_matches_reference(dtype, tol):
    inputs, _ = _inputs(2, 1, 3, 16, 40, seed=7, beta_max=2.0)
    q, k, v, g, beta = (t[:, 0] for t in inputs[:5])
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    o_ref, s_ref = gated_delta_rule_reference(*(t.double()[:, None] for t in (q, k, v, g, beta)), inputs[5].double())
    o, s = gated_delta_rule_step_triton(*(t.to(DEVICE) for t in (q, k, v, g, beta, inputs[5])), 0.25)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel(o, o_ref[:, 0]) < tol and rel(s, s_ref) < tol


def test_launch_retries_without_pipelining_when_shared_memory_runs_out():
    from triton.runtime.errors import OutOfResources

    from revival.ops.delta_rule.triton.forward import launch

    class Kernel:  # fits only with num_stages=1, like a pipelined sequential kernel on a small chip
        calls = []

        def __getitem__(self, grid):
            def run(*args, **options):
                self.calls.append(options.get("num_stages"))
                if options.get("num_stages") != 1:
                    raise OutOfResources(300000, 232448, "shared memory")
            return run

    kernel = Kernel()
    launch(kernel, (1,), 0, num_warps=4)
    launch(kernel, (1,), 0, num_warps=4)  # the second call goes straight to the setting that fits
    assert Kernel.calls == [None, 1, 1]


def test_kernel_chunk_size():
    assert [kernel_chunk_size(c) for c in (1, 16, 30, 64, 128)] == [16, 16, 32, 64, 64]


def test_inputs_outside_the_kernels_limits_are_named():
    """float64 q and a value head dim over 256 (tiles held whole on chip): ValueErrors naming the arguments, before
    any kernel runs."""
    q, k, v, g, beta, state = _inputs(1, 4, 1, 16, 16, seed=5)[0]
    with pytest.raises(ValueError, match=r"^q: impl='triton' supports float32/bfloat16/float16 inputs, got float64"):
        gated_delta_rule_triton(q.double(), k, v, g, beta, state, 0.25)
    wide = torch.randn(1, 4, 1, 300)
    with pytest.raises(ValueError, match=r"^q, v: impl='triton' supports head dims up to 256, got Dk=16, Dv=300$"):
        gated_delta_rule_triton(q, k, wide, g, beta, None, 0.25)


def test_document_starts_match_reference():
    """Packed documents: starts at t = 0, twice in a row, on a chunk boundary (16, 32) and at the last token; the
    second row has one start inside a chunk. Outputs, final state and every gradient against float64."""
    inputs, weights = _inputs(2, 40, 2, 16, 24, seed=13, beta_max=2.0)
    kernel = partial(gated_delta_rule_triton, scale=0.25, chunk_size=16)
    check_packed_documents(gated_delta_rule_reference, kernel, inputs, weights, NAMES)


def test_dispatch():
    """impl='triton' through the public op (also with document starts, and one token without gradients through the
    step kernel), and a bad impl named."""
    inputs, _ = _inputs(1, 20, 1, 16, 16, seed=3)
    x = [t.to(DEVICE) for t in inputs]
    check_dispatch(gated_delta_rule, x, [*(t[:, :1] for t in x[:5]), x[5]])


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the transposed-MMA-layout failure (fla #640) shows on Hopper")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Dv", [128, 256])  # 256: the 125M preset's value heads (expand_v 2)
def test_gradients_at_a_real_shape_on_the_gpu(Dv, dtype):
    """(2, 1024, 4, 128, Dv), beta up to 2: every gradient within 2e-2 (bfloat16) or 1e-3 (float32: three-pass tf32,
    launch settings that fit sm_90's shared memory at Dk = 128) of float64 (the reference on the GPU). A `tl.trans`
    of a matrix-unit result feeding another product gave wrong dk, dbeta on Hopper with Triton < 3.7.1 in fla's
    kernels; these kernels never do that, and this test would see it."""
    inputs, weights = _inputs(2, 1024, 4, 128, Dv, seed=11, beta_max=2.0)
    rounded = [x.to(dtype).double() if index < 3 else x.double() for index, x in enumerate(inputs)]
    ref = _run(gated_delta_rule_reference, rounded, weights, "cuda")
    got = _run(lambda *a: gated_delta_rule_triton(*a, 128**-0.5), inputs, weights, "cuda", dtype=dtype)
    assert_close(got, ref, NAMES, 2e-2 if dtype == torch.bfloat16 else 1e-3)


def _record_launches(monkeypatch) -> list[dict]:
    """Every kernel launch of the chunkwise forward and backward: {"kernel", "q" (dtype of the first tensor),
    **options} (the launches still run)."""
    from revival.ops.delta_rule.triton import backward, forward

    calls, launch = [], forward.launch

    def recording(kernel, grid, *args, **options):
        calls.append({"kernel": kernel.__name__, "first": args[0].dtype, **options})
        launch(kernel, grid, *args, **options)

    monkeypatch.setattr(forward, "launch", recording)
    monkeypatch.setattr(backward, "launch", recording)
    return calls


def test_autocast_dtypes_take_the_16_bit_products(monkeypatch):
    """Under bf16 autocast the layer hands float32 q, k (F.normalize runs in float32) and a bf16 v: the kernels
    read all three in bf16 with tf32 products (float32 "ieee" products compiled for minutes on the H200), o comes
    back in q's dtype, and the results are those of bf16 inputs."""
    calls = _record_launches(monkeypatch)
    inputs, weights = _inputs(1, 40, 2, 16, 32, seed=5)
    inputs[2] = inputs[2].bfloat16()
    ref = _reference([x.bfloat16().double() if i < 3 else x for i, x in enumerate(inputs)], weights)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 0.25, chunk_size=16), inputs, weights, DEVICE)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32 and got[4].dtype == torch.bfloat16
    assert sorted({call["kernel"] for call in calls}) == ["_dstates_kernel", "_local_du_kernel", "_output_grads_kernel",
                                                         "_output_kernel", "_states_kernel",
                                                         "_wy_grads_kernel", "_wy_kernel"]
    assert {call["PRECISION"] for call in calls} == {"tf32"}
    assert {call["first"] for call in calls if call["kernel"] in ("_wy_kernel", "_output_kernel")} == {torch.bfloat16}
    assert_close(got, ref, NAMES, 1e-2)


def test_no_cuda_core_products_and_an_unpipelined_gradient_kernel(monkeypatch):
    """float32 inputs use three-pass tf32, not "ieee" (CUDA-core (64, 64) products: ~100 KB of spills per thread,
    minutes of compilation on sm_90); the gradient kernels launch with num_stages=1 (pipelined, the single kernel
    before them asked sm_90 for more shared memory than it has, so each new shape compiled it twice)."""
    from revival.ops.delta_rule.triton.forward import product_precision

    assert "ieee" not in {product_precision(dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    calls = _record_launches(monkeypatch)
    inputs, weights = _inputs(1, 20, 1, 16, 16, seed=2)
    _run(lambda *a: gated_delta_rule_triton(*a, 0.25, chunk_size=16), inputs, weights, DEVICE)
    grads = ("_output_grads_kernel", "_wy_grads_kernel")
    assert [call.get("num_stages") for call in calls if call["kernel"] in grads] == [1, 1]


def test_gradient_kernels_take_dv_tiles_of_at_least_32(monkeypatch):
    """Dv = 16 at chunk 64 with 16-wide tiles asked for: both gradient kernels and the state-gradient walk launch with
    32-wide Dv-tiles (16-wide, `_wy_grads_kernel` read shared memory out of bounds on the H200 in float32 and
    `_dstates_kernel` took an illegal address at bf16 (128, 256); docs/kernels.md), and the gradients still match
    float64 (the masks cover the tile's unused half)."""
    from revival.ops.delta_rule.triton.config import wide_block_v

    assert [wide_block_v(block, BV) for block, BV in ((16, 16), (16, 128), (32, 16), (64, 32), (64, 256))] == [
        32, 32, 32, 32, 64]
    calls = _record_launches(monkeypatch)
    inputs, weights = _inputs(1, 9, 2, 16, 16, seed=41)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(block_v_grads=16, block_v_dstates=16)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 0.25, chunk_size=64, launch=launch), inputs, weights, DEVICE)
    wide = ("_output_grads_kernel", "_wy_grads_kernel", "_dstates_kernel")
    assert sorted((call["kernel"], call["BV"]) for call in calls if call["kernel"] in wide) == sorted(
        (k, 32) for k in wide)
    assert_close(got, ref, NAMES, 1e-5)


def test_kernels_do_not_specialise_on_the_sequence_length():
    """T, the chunk count and the walks' segment span are not specialisation keys of the chunkwise kernels (Triton
    compiles again for an integer argument equal to 1 or divisible by 16: tasks with lengths 3-256 compiled each
    kernel several times); the head dims stay keys. Checked on the JIT kernels, in a process without
    TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    script = (
        "from revival.ops.delta_rule.triton import backward, forward\n"
        "for kernel in (forward._wy_kernel, forward._states_kernel, forward._output_kernel,\n"
        "               backward._local_du_kernel, backward._dstates_kernel, backward._output_grads_kernel,\n"
        "               backward._wy_grads_kernel):\n"
        "    fixed = sorted(p.name for p in kernel.params if p.do_not_specialize)\n"
        "    print(kernel.__name__, ','.join(fixed))\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    unspecialised = dict(line.partition(" ")[::2] for line in done.stdout.splitlines())
    assert unspecialised == {"_wy_kernel": "NC,T", "_states_kernel": "NC,SPAN,T", "_output_kernel": "NC,T",
                             "_local_du_kernel": "T",
                             "_dstates_kernel": "NC,SPAN,T", "_output_grads_kernel": "NC,T",
                             "_wy_grads_kernel": "NC,T"}


@pytest.mark.skipif(DEVICE != "cuda", reason="counts compiled kernels: needs CUDA")
def test_one_compilation_per_kernel_across_lengths_on_the_gpu():
    """bf16 forward + backward at T = 3 ... 256 (the parity task's lengths) compile each kernel once: every length
    after the first finds its kernels in Triton's cache. Head dims (40, 56) that no other test uses."""
    from revival.ops.delta_rule.triton import backward, forward

    kernels = (forward._wy_kernel, forward._states_kernel, forward._output_kernel, backward._local_du_kernel,
               backward._dstates_kernel, backward._output_grads_kernel,
               backward._wy_grads_kernel)

    def compiled() -> list[int]:
        return [sum(len(entry[0]) for entry in kernel.device_caches.values()) for kernel in kernels]

    counts = []
    for T in (40, 3, 16, 64, 65, 100, 256):
        inputs, weights = _inputs(2, T, 2, 40, 56, seed=T)
        _run(lambda *a: gated_delta_rule_triton(*a, 40**-0.5), inputs, weights, "cuda", dtype=torch.bfloat16)
        counts.append(compiled())
    assert all(count == counts[0] for count in counts), counts
