"""Triton mLSTM kernels against the float64 recurrent reference.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 at small shapes (set here before the kernels are
imported). Note: the interpreter multiplies bfloat16 matrices wrongly, so the kernels upcast those products to float32
there; bfloat16 rounding of the dot operands is checked on the GPU (benchmarks/gpu_mlstm.py --check).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.ops.mlstm import LaunchConfig, mlstm, mlstm_step  # noqa: E402
from revival.ops.mlstm.triton import available, mlstm_step_triton  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
NAMES = ("h", "C", "n", "m", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0")


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double().cpu() - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-30)).item()


def _inputs(B, H, T, Dk, Dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v = rand(B, H, T, Dk).to(dtype), rand(B, H, T, Dk).to(dtype), rand(B, H, T, Dv).to(dtype)
    i, f = rand(B, H, T), rand(B, H, T) + 2.0
    state = (rand(B, H, Dk, Dv), rand(B, H, Dk), rand(B, H))
    weights = [rand(B, H, T, Dv), rand(B, H, Dk, Dv), rand(B, H, Dk), rand(B, H)]
    return [q, k, v, i, f, *state], [w.double() for w in weights]


def _run(inputs, weights, impl, chunk_size, device, **settings):
    """Outputs and gradients of one call; `settings`: the Triton kernels' `precision` / `launch`."""
    xs = [x.detach().to(device).clone().requires_grad_(True) for x in inputs]
    h, (C, n, m) = mlstm(*xs[:5], tuple(xs[5:]), impl=impl, chunk_size=chunk_size, **settings)
    outs = (h, C, n, m)
    loss = sum((o.double() * w.to(device)).sum() for o, w in zip(outs, weights))
    loss.backward()
    return [o.detach() for o in outs] + [x.grad for x in xs]


CASES = [
    # B, H, T, Dk, Dv, chunk, dtype, tolerance
    (1, 2, 37, 16, 32, 16, torch.float32, 1e-5),  # tail chunk, Dk != Dv
    (1, 1, 45, 24, 40, 16, torch.float32, 1e-5),  # head dims that are not powers of two
    (1, 1, 20, 16, 160, 16, torch.float32, 1e-5),  # Dv split over tiles (partial dq/dk sums)
    (2, 1, 64, 32, 32, 32, torch.bfloat16, 1e-2),
    (1, 1, 50, 16, 16, 16, torch.float16, 2e-3),
    (1, 1, 19, 16, 288, 16, torch.float32, 1e-5),  # Dv > 256: the wide-head launch shapes
]


@pytest.mark.parametrize("B,H,T,Dk,Dv,chunk,dtype,tol", CASES)
def test_forward_backward_match_float64_reference(B, H, T, Dk, Dv, chunk, dtype, tol):
    inputs, weights = _inputs(B, H, T, Dk, Dv, dtype, seed=T + Dk + Dv)
    ref = _run([x.double() for x in inputs], weights, "recurrent", chunk, "cpu")
    got = _run(inputs, weights, "triton", chunk, DEVICE)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    errors = {name: _rel(g, r) for name, g, r in zip(NAMES, got, ref)}
    assert all(torch.isfinite(g).all() for g in got)
    assert max(errors.values()) < tol, errors


def test_recomputed_chunk_states_give_the_same_gradients():
    """When the forward does not keep the chunk states (large heads), the backward recomputes them: same results."""
    from revival.ops.mlstm.triton import keep_chunk_states, launch_config

    ratio = launch_config(128, 128).keep_states_max_ratio
    assert keep_chunk_states(128, 128, 64, 4, 2, ratio)  # the common case keeps them
    assert not keep_chunk_states(384, 384, 32, 4, 2, ratio)
    inputs, weights = _inputs(1, 2, 37, 16, 32, torch.float32, seed=3)
    kept = _run(inputs, weights, "triton", 16, DEVICE)
    recomputed = _run(inputs, weights, "triton", 16, DEVICE, launch=LaunchConfig(keep_states_max_ratio=0.0))
    for name, a, b in zip(NAMES, recomputed, kept):
        assert torch.equal(a, b), name


def test_kernel_chunk_size_fits_large_head_dims():
    from revival.ops.mlstm.triton import kernel_chunk_size

    assert [kernel_chunk_size(64, dk) for dk in (64, 128, 256, 384, 512, 1024)] == [64, 64, 64, 32, 32, 16]
    assert [kernel_chunk_size(c, 128) for c in (8, 16, 128, 256)] == [16, 16, 128, 128]


@pytest.mark.parametrize("mode", ["fast", "fast32", "balanced", "precise"])
def test_bfloat16_precision_modes(mode):
    inputs, weights = _inputs(1, 2, 45, 32, 64, torch.bfloat16, seed=11)
    ref = _run([x.double() for x in inputs], weights, "recurrent", 16, "cpu")
    got = _run(inputs, weights, "triton", 16, DEVICE, precision=mode)
    errors = {name: _rel(g, r) for name, g, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < 1e-2, errors


def test_auto_precision_splits_only_for_an_initial_state_gradient(monkeypatch):
    """precision "auto" (the default): "balanced" when the initial state needs a gradient, else "fast" (16-bit
    chunk states). Both within the bfloat16 bound of float64: without a state (zeros) and with a detached state."""
    from revival.ops.mlstm.triton import forward

    used = []
    original = forward.chunk_states

    def recording(*args):  # the preset each call asked for and the dtype of the chunk states it got
        states = original(*args)
        used.append((args[-1], states[0].dtype))
        return states

    monkeypatch.setattr(forward, "chunk_states", recording)
    inputs, weights = _inputs(1, 2, 45, 32, 64, torch.bfloat16, seed=12)
    got = _run(inputs, weights, "triton", 16, DEVICE)  # the initial state requires grad
    assert used == [("balanced", torch.float32)]
    ref = _run([x.double() for x in inputs], weights, "recurrent", 16, "cpu")
    assert max(_rel(g, r) for g, r in zip(got, ref)) < 1e-2

    for state in (None, [x.detach() for x in inputs[5:]]):
        used.clear()
        outs = []
        for impl, device, cast in (("triton", DEVICE, lambda x: x), ("recurrent", "cpu", torch.Tensor.double)):
            xs = [cast(x).detach().to(device).clone().requires_grad_(True) for x in inputs[:5]]
            st = None if state is None else tuple(cast(x).to(device) for x in state)
            h, (C, n, m) = mlstm(*xs, st, impl=impl, chunk_size=16)
            sum((o.double() * w.to(device)).sum() for o, w in zip((h, C, n, m), weights)).backward()
            outs.append([o.detach() for o in (h, C, n, m)] + [x.grad for x in xs])
        assert used == [("fast", torch.bfloat16)], state is None
        errors = {name: _rel(g, r) for name, g, r in zip(NAMES, *outs)}
        assert max(errors.values()) < 1e-2, errors


def test_unknown_precision_mode_is_rejected():
    inputs, _ = _inputs(1, 1, 4, 16, 16, torch.float32, seed=0)
    for impl in ("triton", "chunkwise"):  # named on every impl, not only where it takes effect
        with pytest.raises(ValueError, match="precision.*'quick'"):
            mlstm(*inputs[:5], impl=impl, precision="quick")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]])
def test_two_launch_gradient_kernel(case):
    """The gradient kernel in two launches (grad_fused=False: dq side, then dk/dv side; 32-wide Dv-tiles) against the
    float64 reference (the default is one launch)."""
    B, H, T, Dk, Dv, chunk, dtype, tol = case
    inputs, weights = _inputs(B, H, T, Dk, Dv, dtype, seed=T + Dk + Dv)
    ref = _run([x.double() for x in inputs], weights, "recurrent", chunk, "cpu")
    got = _run(inputs, weights, "triton", chunk, DEVICE, launch=LaunchConfig(grad_fused=False, block_v_grad=32))
    errors = {name: _rel(g, r) for name, g, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_sequential_and_chunk_parallel_state_recurrences(case, monkeypatch):
    """The state recurrences run sequentially over chunks (many batch*head rows) or chunk-parallel (few rows: the
    stabilizer scan, every chunk's own term at once, then an elementwise scan over chunks). Both against float64,
    the chunk-parallel one with small scan steps so that the steps' carries are exercised (3 and 2 chunks/step)."""
    from revival.ops.mlstm.triton import forward

    B, H, T, Dk, Dv, chunk, dtype, tol = case
    inputs, weights = _inputs(B, H, T, Dk, Dv, dtype, seed=T + Dk + Dv + 1)
    ref = _run([x.double() for x in inputs], weights, "recurrent", chunk, "cpu")
    calls = []
    original = forward.chunk_scan
    monkeypatch.setattr(forward, "chunk_scan", lambda *a, **k: calls.append(k["reverse"]) or original(*a, **k))
    from revival.ops.mlstm.triton import backward

    monkeypatch.setattr(backward, "chunk_scan", forward.chunk_scan)  # a spy: records the calls, changes nothing
    results = {}
    for name, min_programs in (("sequential", 0), ("chunk-parallel", 1 << 30)):
        launch = LaunchConfig(seq_min_programs=min_programs, stabilizer_chunks=2, scan_chunks=2)
        calls.clear()
        results[name] = _run(inputs, weights, "triton", chunk, DEVICE, launch=launch)
        assert calls == ([] if min_programs == 0 else [False, False, True, True]), name
        errors = {n: _rel(g, r) for n, g, r in zip(NAMES, results[name], ref)}
        assert max(errors.values()) < tol, (name, errors)
    tol_between = 1e-5 if dtype == torch.float32 else 2e-2
    for n, a, b in zip(NAMES, results["sequential"], results["chunk-parallel"]):
        assert _rel(a, b.double()) < tol_between, n


def test_state_carry_equals_one_pass():
    inputs, _ = _inputs(1, 1, 40, 16, 16, torch.float32, seed=1)
    x = [t.to(DEVICE) for t in inputs]
    h_full, state_full = mlstm(*x[:5], tuple(x[5:]), impl="triton", chunk_size=16)
    h1, state = mlstm(*(t[:, :, :23] for t in x[:5]), tuple(x[5:]), impl="triton", chunk_size=16)
    h2, state = mlstm(*(t[:, :, 23:] for t in x[:5]), state, impl="triton", chunk_size=16)
    assert _rel(torch.cat([h1, h2], 2), h_full.double()) < 1e-5
    assert _rel(state[0], state_full[0].double()) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_step_matches_reference(dtype, tol):
    inputs, _ = _inputs(2, 3, 1, 16, 48, dtype, seed=7)
    q, k, v, i, f = (t[:, :, 0] for t in inputs[:5])
    state = tuple(inputs[5:])
    h_ref, (C_ref, n_ref, m_ref) = mlstm_step(*(t.double() for t in (q, k, v, i, f)), tuple(s.double() for s in state))
    dev = [t.to(DEVICE) for t in (q, k, v, i, f)]
    h, (C, n, m) = mlstm_step_triton(*dev, tuple(s.to(DEVICE) for s in state))
    assert h.dtype == dtype and C.dtype == torch.float32
    assert _rel(h, h_ref) < tol and _rel(C, C_ref) < 1e-5 and _rel(n, n_ref) < 1e-5 and _rel(m, m_ref) < 1e-6


STEP_LAUNCHES = [  # every variant, with blocks that leave masked tails in Dk and Dv for the odd shapes below
    None,  # the default of the shape
    ("tile", dict(block_v=16, num_warps=2)),
    ("stream", dict(block_k=8, block_v=16, num_stages=2)),
    ("stream", dict(block_k=16, block_v=64, num_stages=3)),
]
STEP_SHAPES = [(2, 3, 20, 40), (1, 4, 32, 64), (1, 1, 24, 1)]  # B, H, Dk, Dv: odd dims, batch 1 (7B-like), Dv = 1


def _step_case(B, H, Dk, Dv, dtype, seed):
    inputs, _ = _inputs(B, H, 1, Dk, Dv, dtype, seed=seed)
    x = [t[:, :, 0] for t in inputs[:5]]
    state = tuple(inputs[5:])
    ref = mlstm_step(*(t.double() for t in x), tuple(s.double() for s in state))
    return [t.to(DEVICE) for t in x], tuple(s.to(DEVICE) for s in state), ref


@pytest.mark.parametrize("shape", STEP_SHAPES)
@pytest.mark.parametrize("launch", STEP_LAUNCHES, ids=lambda c: "default" if c is None else f"{c[0]}-{c[1]}")
def test_step_variants_match_reference(launch, shape):
    from revival.ops.mlstm.triton.step import StepLaunch

    x, state, (h_ref, (C_ref, n_ref, m_ref)) = _step_case(*shape, torch.float32, seed=sum(shape))
    cfg = None if launch is None else StepLaunch(variant=launch[0], **launch[1])
    h, (C, n, m) = mlstm_step_triton(*x, state, launch=cfg)
    assert h.dtype == torch.float32 and C.dtype == torch.float32
    errors = {"h": _rel(h, h_ref), "C": _rel(C, C_ref), "n": _rel(n, n_ref), "m": _rel(m, m_ref)}
    assert max(errors.values()) < 1e-5, errors


def test_step_default_launch_per_shape():
    """The H200 probe's winners (benchmarks/results/gpu_mlstm_step_variants.json): stream BK 32 / BV 64 at
    (16, 8, 256, 512), tile at (1, 8, 256, 512) and (16, 4, 96, 192)."""
    from revival.ops.mlstm.triton.step import StepLaunch, step_launch

    assert step_launch(16 * 8, 256, 512) == StepLaunch("stream", block_k=32, block_v=64, num_warps=4, num_stages=2)
    assert step_launch(1 * 8, 256, 512) == StepLaunch("tile", block_v=32, num_warps=4)
    assert step_launch(16 * 4, 96, 192) == StepLaunch("tile", block_v=64, num_warps=4)


def test_step_default_stream_launch_matches_reference():
    """The default launch of large states (an interpreted 4M-element state takes ~15 s) at a small shape: several
    BK-row blocks with a masked tail in Dk (100 = 3 x 32 + 4) and in Dv (72 = 64 + 8)."""
    from revival.ops.mlstm.triton.step import step_launch

    x, state, (h_ref, (C_ref, n_ref, m_ref)) = _step_case(1, 2, 100, 72, torch.float32, seed=1)
    h, (C, n, m) = mlstm_step_triton(*x, state, launch=step_launch(16 * 8, 256, 512))
    errors = {"h": _rel(h, h_ref), "C": _rel(C, C_ref), "n": _rel(n, n_ref), "m": _rel(m, m_ref)}
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("variant", ["tile", "stream"])
def test_step_writes_into_out_and_updates_C_in_place(variant):
    from revival.ops.mlstm.triton.step import StepLaunch

    x, state, (h_ref, (C_ref, n_ref, m_ref)) = _step_case(2, 3, 20, 40, torch.bfloat16, seed=5)
    C_in = state[0].clone()
    out = (torch.empty_like(x[2]), C_in, torch.empty_like(state[1]), torch.empty_like(state[2]))
    cfg = StepLaunch(variant=variant, block_k=8, block_v=16)
    h, (C, n, m) = mlstm_step_triton(*x, (C_in, *state[1:]), launch=cfg, out=out)
    assert all(a is b for a, b in zip((h, C, n, m), out))
    assert _rel(h, h_ref) < 1e-2 and _rel(C_in, C_ref) < 1e-5 and _rel(n, n_ref) < 1e-5 and _rel(m, m_ref) < 1e-6


def test_step_launch_and_out_errors_name_the_argument():
    from revival.ops.mlstm.triton.step import StepLaunch

    with pytest.raises(ValueError, match="variant: expected one of"):
        StepLaunch(variant="rows")
    with pytest.raises(ValueError, match="block_k: expected a power of two"):
        StepLaunch(block_k=24)
    x, state, _ = _step_case(1, 2, 16, 16, torch.float32, seed=0)
    good = (torch.empty_like(x[2]), torch.empty_like(state[0]), torch.empty_like(state[1]), torch.empty_like(state[2]))
    with pytest.raises(ValueError, match=r"out \(n\): must not be the input state's n"):
        mlstm_step_triton(*x, state, out=(*good[:2], state[1], good[3]))
    with pytest.raises(ValueError, match=r"out \(C\): expected a contiguous torch.float32"):
        mlstm_step_triton(*x, state, out=(good[0], good[1].double(), *good[2:]))


def test_steps_continue_the_chunkwise_state():
    inputs, _ = _inputs(1, 2, 21, 16, 16, torch.float32, seed=3)
    x = [t.to(DEVICE) for t in inputs]
    h_seq, _ = mlstm(*x[:5], tuple(x[5:]), impl="triton", chunk_size=16)
    _, state = mlstm(*(t[:, :, :20] for t in x[:5]), tuple(x[5:]), impl="triton", chunk_size=16)
    h_step, _ = mlstm_step_triton(*(t[:, :, 20] for t in x[:5]), state)
    assert _rel(h_step, h_seq[:, :, 20].double()) < 1e-5


def test_available_and_float64_rejected():
    assert available()
    inputs, _ = _inputs(1, 1, 4, 16, 16, torch.float64, seed=0)
    with pytest.raises(ValueError, match="float64"):
        mlstm(*inputs[:5], impl="triton")



def test_row_dot_matches_float64():
    from revival.ops.mlstm.triton.backward import row_dot

    g = torch.Generator().manual_seed(0)
    for B, H, T, D in [(1, 3, 70, 200), (2, 2, 5, 16)]:
        a, b = torch.randn(B, H, T, D, generator=g), torch.randn(B, T, H, D, generator=g).transpose(1, 2)
        got = row_dot(a.bfloat16().to(DEVICE), b.bfloat16().to(DEVICE))  # a head-major, b token-major
        ref = (a.bfloat16().double() * b.bfloat16().double()).sum(-1).reshape(B * H, T)
        assert got.dtype == torch.float32 and got.shape == (B * H, T)
        assert _rel(got, ref) < 1e-6


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], (2, 3, 40, 16, 32, 16, torch.float32, 1e-5)])
def test_token_major_views_as_inputs(case, sequential):
    """q, k, v as per-head views of one projection output (B, T, 2 H Dk + H Dv), as the xLSTM-7B layer passes them:
    the kernels read them in place; h and the gradients come back stored token-major (B, T, H, D)."""
    launch = LaunchConfig(seq_min_programs=0 if sequential else 1 << 30)
    B, H, T, Dk, Dv, chunk, dtype, tol = case
    inputs, weights = _inputs(B, H, T, Dk, Dv, dtype, seed=T + Dk + Dv + 2)
    ref = _run([x.double() for x in inputs], weights, "recurrent", chunk, "cpu")
    q, k, v = inputs[:3]
    packed = torch.cat([x.transpose(1, 2).reshape(B, T, -1) for x in (q, k, v)], dim=-1).to(DEVICE)
    packed.requires_grad_(True)
    views = packed.split([H * Dk, H * Dk, H * Dv], dim=-1)
    q, k, v = (x.view(B, T, H, -1).transpose(1, 2) for x in views)
    rest = [x.detach().to(DEVICE).clone().requires_grad_(True) for x in inputs[3:]]
    h, (C, n, m) = mlstm(q, k, v, *rest[:2], tuple(rest[2:]), impl="triton", chunk_size=chunk, launch=launch)
    assert h.transpose(1, 2).is_contiguous()  # stored (B, T, H, Dv), like v
    loss = sum((o.double() * w.to(DEVICE)).sum() for o, w in zip((h, C, n, m), weights))
    loss.backward()
    dq, dk, dv = (x.view(B, T, H, -1).transpose(1, 2) for x in packed.grad.split([H * Dk, H * Dk, H * Dv], -1))
    got = [h.detach(), C.detach(), n.detach(), m.detach(), dq, dk, dv] + [x.grad for x in rest]
    errors = {name: _rel(g, r) for name, g, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < tol, errors


def test_launch_config_fills_unset_fields_from_the_shape():
    """The launch config is a pure function of the head dims and what the caller sets (no module state)."""
    import dataclasses

    from revival.ops.mlstm.triton import launch_config

    narrow, wide = launch_config(32, 128), launch_config(128, 512)
    assert narrow.grad_fused and narrow.block_v_out == 128 and narrow.warps_grad == 8
    assert not wide.grad_fused and wide.block_v_out == 32 and wide.span_out == 512
    assert launch_config(96, 192).span_out == 192  # the odd spans: one program over all of Dv
    assert launch_config(128, 512, LaunchConfig(warps_out=8)) == dataclasses.replace(wide, warps_out=8)
    assert launch_config(128, 512) == wide
    inputs, _ = _inputs(1, 1, 4, 16, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="launch: expected a LaunchConfig"):
        mlstm(*inputs[:5], impl="triton", launch={"warps_out": 8})


@pytest.mark.parametrize("offset", [0, 1])
def test_step_repeated_calls_use_the_compiled_launch(offset):
    """The second and later calls of a specialisation launch the compiled kernel directly (revival.ops._triton.
    CompiledLaunch); a view off 16-byte alignment is its own specialisation. Every call must match the reference."""
    inputs, _ = _inputs(2, 3, 1, 16, 48, torch.bfloat16, seed=11)
    q, k, v, i, f = (t[:, :, 0].to(DEVICE) for t in inputs[:5])
    q = torch.cat([q.flatten(), q.flatten()])[offset: offset + q.numel()].view(q.shape)  # offset 1: misaligned
    state = tuple(s.to(DEVICE) for s in inputs[5:])
    h_ref, (C_ref, _, _) = mlstm_step(*(t.double().cpu() for t in (q, k, v, i, f)), tuple(s.double().cpu()
                                                                                          for s in state))
    for _ in range(3):
        h, (C, _, _) = mlstm_step_triton(q, k, v, i, f, state)
        assert _rel(h, h_ref) < 1e-2 and _rel(C, C_ref) < 1e-5
