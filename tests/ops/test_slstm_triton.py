"""Triton sLSTM kernels against the float64 reference: outputs, final states, gradients of x_gates, recurrent_weight
and the initial state, continuation, the per-unit first-step rule, both weight placements, dtypes, dispatch.

Without CUDA the kernels run under TRITON_INTERPRET=1 at tiny shapes (set before triton is imported). The interpreter
mis-multiplies bfloat16 matrices, so there the products are float32; bfloat16 products are checked on the GPU by
`benchmarks/gpu_slstm.py`.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.ops.slstm import slstm  # noqa: E402
from revival.ops.slstm.reference import slstm_reference  # noqa: E402
from revival.ops.slstm.triton import LaunchConfig, available, slstm_triton  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
F64 = torch.float64
NAMES = ("y", "c", "n", "m", "y_last", "dx", "dR", "dc0", "dn0", "dm0", "dy0")


def make_inputs(B, T, H, d, *, seed, state="random", scale=2.0):
    """float64 x_gates (B, T, 4, H, d), R (4, H, d, d), a state (n == 0 in some units for "mixed") and weights
    for a random linear loss over y and the final state."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 4, H, d, generator=g, dtype=F64) * scale
    R = torch.randn(4, H, d, d, generator=g, dtype=F64) * d**-0.5
    c, y = torch.randn(B, H, d, generator=g, dtype=F64), torch.randn(B, H, d, generator=g, dtype=F64)
    n = torch.rand(B, H, d, generator=g, dtype=F64) + 0.5
    m = torch.randn(B, H, d, generator=g, dtype=F64)
    if state == "mixed":
        empty = torch.rand(B, H, d, generator=g) < 0.5
        c, n = c.masked_fill(empty, 0.0), n.masked_fill(empty, 0.0)
    if state == "zeros":
        c, n, m, y = (torch.zeros(B, H, d, dtype=F64) for _ in range(4))
    weights = [torch.randn(B, T, H, d, generator=g, dtype=F64)] + [torch.randn(B, H, d, generator=g, dtype=F64)
                                                                   for _ in range(4)]
    return x, R, (c, n, m, y), weights


def outputs_and_grads(fn, x, R, state, weights, dtype):
    leaves = [t.to(device=DEVICE, dtype=dtype if i == 0 else torch.float32 if dtype != F64 else F64)
              .clone().requires_grad_() for i, t in enumerate((x, R, *state))]
    y, final = fn(leaves[0], leaves[1], tuple(leaves[2:]))
    outs = [y, *final]
    loss = sum((o.double() * w.to(DEVICE)).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach().double().cpu() for o in outs] + [t.grad.double().cpu() for t in leaves]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_against_reference(x, R, state, weights, *, dtype=torch.float32, tol=1e-5, mode=None, launch=None):
    ref = outputs_and_grads(slstm_reference, x, R, state, weights, F64)
    launch = LaunchConfig(weights=mode, **(launch or {}))
    got = outputs_and_grads(lambda *a: slstm_triton(*a, launch=launch), x, R, state, weights, dtype)
    for name, a, b in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def test_available_here():
    assert available()


@pytest.mark.parametrize("mode", ["resident", "streamed", "split"])
@pytest.mark.parametrize("B,T,H,d", [(3, 9, 2, 20), (17, 4, 1, 16), (2, 5, 1, 40)])  # padded; two batch blocks;
# streamed weights in two column slices (d = 40 -> D = 64, BLOCK_K = 32, the second slice half masked)
def test_matches_float64_reference(B, T, H, d, mode):
    x, R, state, weights = make_inputs(B, T, H, d, seed=B * 100 + d)
    check_against_reference(x, R, state, weights, mode=mode)


@pytest.mark.parametrize("kind", ["mixed", "zeros"])
def test_first_step_rule_per_unit(kind):
    """n == 0 units (all of them for a zero state) take m = i and forget factor 0, also with extreme gates."""
    x, R, state, weights = make_inputs(2, 6, 1, 16, seed=7, state=kind, scale=8.0)
    check_against_reference(x, R, state, weights, tol=1e-4)


def test_head_dim_32_and_64():
    for d in (32, 64):
        x, R, state, weights = make_inputs(1, 3, 1, d, seed=d)
        check_against_reference(x, R, state, weights, tol=1e-5)


def test_continuation_equals_one_pass():
    x, R, state, _ = make_inputs(2, 10, 2, 16, seed=3)
    args = dict(device=DEVICE, dtype=torch.float32)
    x, R, state = x.to(**args), R.to(**args), tuple(s.to(**args) for s in state)
    y_full, final_full = slstm(x, R, state, impl="triton")
    y_a, mid = slstm(x[:, :4], R, state, impl="triton")
    y_b, final_split = slstm(x[:, 4:], R, mid, impl="triton")
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y_full, rtol=1e-6, atol=1e-6)
    for a, b in zip(final_split, final_full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """Half-precision x_gates: y in that dtype, states float32, close to the reference run on the rounded inputs."""
    x, R, state, weights = make_inputs(2, 5, 1, 16, seed=11)
    x = x.to(dtype).to(F64)  # the reference sees the same rounded inputs
    got = outputs_and_grads(lambda *a: slstm(*a, impl="triton"), x, R, state, weights, dtype)
    ref = outputs_and_grads(slstm_reference, x, R, state, weights, F64)
    for name, a, b in zip(NAMES, got, ref):
        tol = 2e-2 if ON_GPU else 1e-2  # y and dx are rounded to the input dtype
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    y, final = slstm(x.to(dtype).to(DEVICE), R.float().to(DEVICE), None, impl="triton")
    assert y.dtype == dtype and all(s.dtype == torch.float32 for s in final)


def test_streamed_slices_of_any_width():
    """The streamed product in 16-column slices (four, the last partly padded) gives the same results."""
    x, R, state, weights = make_inputs(2, 4, 2, 56, seed=5)
    check_against_reference(x, R, state, weights, mode="streamed", launch={"block_k": 16})


@pytest.mark.parametrize("B,d", [(3, 40), (17, 56)])
def test_split_heads_over_unit_groups(B, d):
    """Each head's units over 4 programs (U = 16 of D = 64) that exchange y / gate gradients every step; under the
    interpreter one launch per step stands in for the barrier. Mixed first-step state, two batch blocks."""
    x, R, state, weights = make_inputs(B, 5, 2, d, seed=d, state="mixed")
    check_against_reference(x, R, state, weights, mode="split", launch={"split_units": 16})


def test_autocast_runs_the_products_in_the_autocast_dtype():
    """float32 gate inputs under autocast: the kernel reads them in the autocast dtype (as a matmul would); the
    result equals an explicit bfloat16 call; the states stay float32."""
    x, R, state, _ = make_inputs(2, 4, 1, 16, seed=4)
    x32, R32 = x.float().to(DEVICE), R.float().to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, final = slstm(x32, R32, None, impl="triton")
    y_bf16, final_bf16 = slstm(x32.bfloat16(), R32, None, impl="triton")
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_bf16)
    assert all(s.dtype == torch.float32 and torch.equal(s, t) for s, t in zip(final, final_bf16))


def test_weight_mode_validation():
    x, R, state, _ = make_inputs(1, 2, 1, 16, seed=0)
    with pytest.raises(ValueError, match="weights"):
        slstm_triton(x.float().to(DEVICE), R.float().to(DEVICE), tuple(s.float().to(DEVICE) for s in state),
                     launch=LaunchConfig(weights="shared"))
    with pytest.raises(ValueError, match="launch: expected a LaunchConfig"):
        slstm_triton(x.float().to(DEVICE), R.float().to(DEVICE), tuple(s.float().to(DEVICE) for s in state),
                     launch={"weights": "split"})


def test_dispatch_and_validation():
    x, R, _, _ = make_inputs(1, 2, 1, 16, seed=0)
    expected_auto = "triton" if ON_GPU else "fused"  # the interpreter is for tests, not for "auto"
    from revival.ops.slstm import _resolve_impl

    assert _resolve_impl("auto", x.float().to(DEVICE)) == expected_auto
    assert _resolve_impl("auto", x.to(DEVICE)) == "fused"  # float64 stays on the fused path
    with pytest.raises(ValueError, match="float64"):
        slstm(x, R, impl="triton")
    with pytest.raises(ValueError, match="impl"):
        slstm(x.float(), R.float(), impl="cuda")
