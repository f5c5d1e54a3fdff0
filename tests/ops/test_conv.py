"""`revival.ops.conv.causal_conv1d` (shifted multiply-adds, hand-written backward) against its float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.ops.conv import causal_conv1d, causal_conv1d_reference

F64 = torch.float64


def _inputs(B, T, D, K, seed, with_state=True, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g, dtype=F64)
    weight = torch.randn(D, K, generator=g, dtype=F64)
    bias = torch.randn(D, generator=g, dtype=F64) if with_bias else None
    state = torch.randn(B, K - 1, D, generator=g, dtype=F64) if with_state else None
    return x, weight, bias, state


def _outputs_and_grads(fn, leaves, dy):
    leaves = [None if t is None else t.clone().requires_grad_(True) for t in leaves]
    y, new_state = fn(*leaves)
    (y * dy).sum().backward()
    return [y.detach(), new_state.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("with_state,with_bias", [(True, True), (False, False)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_fast_path_matches_the_reference_in_float64(K, T, with_state, with_bias, activation):
    leaves = _inputs(2, T, 5, K, seed=10 * K + T, with_state=with_state, with_bias=with_bias)
    dy = torch.randn(2, T, 5, generator=torch.Generator().manual_seed(1), dtype=F64)

    def reference(x, weight, bias, state):
        y, new_state = causal_conv1d_reference(x, weight, bias, state)
        return (F.silu(y) if activation == "silu" else y), new_state

    def fast(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, state, activation=activation)

    for got, ref in zip(_outputs_and_grads(fast, leaves, dy), _outputs_and_grads(reference, leaves, dy)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the decoding path (no autograd Function) gives the same values
        y, new_state = fast(*leaves)
    torch.testing.assert_close(y, reference(*leaves)[0], rtol=1e-12, atol=1e-12)


def test_document_starts_match_the_reference_and_separate_calls():
    x, weight, bias, state = _inputs(2, 11, 3, 4, seed=5)
    starts = torch.zeros(2, 11, dtype=torch.bool)
    starts[0, 4] = starts[1, 1] = starts[1, 2] = True
    dy = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    got = _outputs_and_grads(lambda *a: causal_conv1d(*a, document_starts=starts), (x, weight, bias, state), dy)
    ref = _outputs_and_grads(lambda *a: causal_conv1d_reference(*a, document_starts=starts), (x, weight, bias, state),
                             dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # row 0: the second document (from step 4) equals a fresh call without state
    y_fresh, _ = causal_conv1d_reference(x[:1, 4:], weight, bias, None)
    torch.testing.assert_close(got[0][:1, 4:], y_fresh, rtol=1e-12, atol=1e-12)


def test_errors_name_the_argument():
    x, weight, bias, state = _inputs(2, 5, 3, 4, seed=0)
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 3, 3\)"):
        causal_conv1d(x, weight, bias, state[:, :2])
    with pytest.raises(ValueError, match="weight: expected shape"):
        causal_conv1d(x, weight[:2], bias, state)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, state, activation="gelu")


# ----------------------------------------------------------------------------------------------- impl="triton"
# The Triton kernels (revival/ops/conv/triton.py) against the float64 reference: on the GPU when there is one, else
# in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at tiny shapes. Full shapes and timings:
# benchmarks/gpu_conv.py.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TILES = dict(block_t=8, block_d=4, num_warps=1, backward_rows=3, backward_block_d=4, backward_chunk_t=7,
                   backward_num_warps=1)  # several time tiles, channel tiles with a ragged edge, backward chunks


def _triton_available():
    from revival.ops.conv.triton import available

    return available()


needs_triton = pytest.mark.skipif(not _triton_available(), reason="Triton cannot run here")


def _starts(B, T):
    """A start at t = 0 in row 0 (it drops the state); 1-token documents; a start on the last step."""
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, 0] = True
    if T >= 3:
        starts[1, 1] = starts[1, 2] = True
    if T > 30:
        starts[0, 5] = starts[0, 6] = starts[1, 20] = starts[1, T - 1] = True
    return starts.to(DEVICE)


def _check_against_reference(fast, leaves, starts, activation, dtype=F64, rtol=1e-12):
    """y, new state and the gradients of every leaf of `fast` (on `leaves` cast to dtype) vs the float64 reference
    on the same (rounded) values; `rtol` bounds each result's relative error in norm."""
    leaves = [None if t is None else t.to(DEVICE, dtype) for t in leaves]
    dy = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(3), dtype=F64).to(DEVICE)

    def reference(x, weight, bias, state):
        y, new_state = causal_conv1d_reference(x, weight, bias, state, document_starts=starts)
        return (F.silu(y) if activation == "silu" else y), new_state

    got = _outputs_and_grads(fast, leaves, dy.to(dtype))
    ref = _outputs_and_grads(reference, [None if t is None else t.double() for t in leaves], dy)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == dtype and a.shape == b.shape, (i, a.dtype, a.shape, b.shape)
        error = (a.double() - b).norm() / max(b.norm(), 1e-30)
        assert error <= rtol, f"result {i} (y, new state, grads of x, weight, bias, state): {error:.2e}"


FLAGS = [  # with_state, with_bias, activation, document starts
    (False, False, None, False), (True, True, "silu", False), (True, False, "silu", True), (False, True, None, True)]


@needs_triton
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [1, 3, 37])
@pytest.mark.parametrize("with_state,with_bias,activation,documents", FLAGS)
def test_triton_matches_the_reference_in_float64(K, T, with_state, with_bias, activation, documents):
    leaves = _inputs(2, T, 5, K, seed=100 + 10 * K + T, with_state=with_state, with_bias=with_bias)
    starts = _starts(2, T) if documents else None

    def fast(x, weight, bias, state):
        return causal_conv1d(x, weight, bias, state, activation=activation, document_starts=starts, impl="triton")

    _check_against_reference(fast, leaves, starts, activation)
    with torch.no_grad():  # the forward kernel without the autograd Function
        y, _ = fast(*[None if t is None else t.to(DEVICE) for t in leaves])
    y_ref, _ = causal_conv1d_reference(*[None if t is None else t.to(DEVICE) for t in leaves], document_starts=starts)
    torch.testing.assert_close(y, F.silu(y_ref) if activation == "silu" else y_ref, rtol=1e-12, atol=1e-12)


@needs_triton
def test_triton_small_tiles_in_float64():
    """Several programs along time and channels, and backward chunks whose weight/bias partial sums are added up."""
    from revival.ops.conv.triton import LaunchConfig, causal_conv1d_triton

    leaves = _inputs(2, 21, 5, 4, seed=7)
    starts = _starts(2, 21)
    starts[0, 9] = starts[0, 16] = True  # on a tile edge (padded position 8 + 8) and in the second chunk
    launch = LaunchConfig(**SMALL_TILES)

    def fast(x, weight, bias, state):
        y = causal_conv1d_triton(x, weight, bias, state, silu=True, document_starts=starts, launch=launch)
        return y, causal_conv1d(x, weight, bias, state, document_starts=starts, impl="shifted")[1]

    _check_against_reference(fast, leaves, starts, "silu")


@needs_triton
# T: 23, less for chunks of 1 and 2 (their edge starts lie in the first 8 steps; one interpreted program per chunk)
@pytest.mark.parametrize("K,chunk,rows,T", [(4, 1, 1, 12), (3, 2, 4, 18), (4, 5, 2, 23), (3, 6, 3, 23)])
def test_triton_backward_chunk_edges_in_float64(K, chunk, rows, T):
    """Backward chunks shorter than their K-1 warm-up and finishing steps, steps per iteration not dividing them, and
    document starts on chunk edges (padded position c0 = chunk * i - (K-1)) and one step either side."""
    from revival.ops.conv.triton import LaunchConfig, causal_conv1d_triton

    leaves = _inputs(2, T, 5, K, seed=11 + K + chunk)
    starts = torch.zeros(2, T, dtype=torch.bool)
    edges = [chunk * i - (K - 1) for i in range(1, T)]
    for t in edges[:4]:
        for row, offset in ((0, 0), (1, -1), (1, 1)):
            if 0 <= t + offset < T:
                starts[row, t + offset] = True
    starts = starts.to(DEVICE)
    launch = LaunchConfig(backward_rows=rows, backward_block_d=4, backward_chunk_t=chunk, backward_num_warps=1)

    def fast(x, weight, bias, state):
        y = causal_conv1d_triton(x, weight, bias, state, silu=True, document_starts=starts, launch=launch)
        return y, causal_conv1d(x, weight, bias, state, document_starts=starts, impl="shifted")[1]

    _check_against_reference(fast, leaves, starts, "silu")


def test_launch_config_is_checked():
    from revival.ops.conv.triton import LaunchConfig

    with pytest.raises(ValueError, match="backward_block_d: expected a power of two, got 48"):
        LaunchConfig(backward_block_d=48)
    with pytest.raises(ValueError, match="backward_rows: expected >= 1, got 0"):
        LaunchConfig(backward_rows=0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_triton_in_16_and_32_bits_with_strided_inputs(dtype):
    """x a channel slice of a wider tensor (time stride 2 D), the incoming gradient in a feature-major layout."""
    x, weight, bias, state = _inputs(2, 37, 6, 4, seed=8)
    wide = torch.cat([x, torch.randn_like(x)], dim=-1)
    starts = _starts(2, 37)

    def fast(wide, weight, bias, state):
        return causal_conv1d(wide[..., :6], weight, bias, state, activation="silu", document_starts=starts,
                             impl="triton")

    def reference_on_slice(wide, weight, bias, state):
        return causal_conv1d_reference(wide[..., :6], weight, bias, state, document_starts=starts)

    leaves = [t.to(DEVICE, dtype) for t in (wide, weight, bias, state)]
    dy = torch.randn(2, 37, 6, generator=torch.Generator().manual_seed(3), dtype=F64).to(DEVICE)
    feature_major = dy.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)  # y's gradient gets this layout
    got = _outputs_and_grads(fast, leaves, feature_major)
    ref = _outputs_and_grads(lambda *a: (F.silu(reference_on_slice(*a)[0]), reference_on_slice(*a)[1]),
                             [t.double() for t in leaves], dy)
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    for i, (a, b) in enumerate(zip(got, ref)):
        error = (a.double() - b).norm() / b.norm()
        assert a.dtype == dtype and error <= rtol, f"result {i}: {a.dtype}, {error:.2e}"


def test_impl_is_checked_and_auto_resolves():
    from revival.ops.conv import IMPLS, _resolve_impl

    x, weight, bias, state = _inputs(2, 5, 3, 4, seed=0)
    with pytest.raises(ValueError, match=r"impl: expected one of \('auto', 'shifted', 'triton'\), got 'fast'"):
        causal_conv1d(x, weight, bias, state, impl="fast")
    assert IMPLS == ("auto", "shifted", "triton")
    assert _resolve_impl("auto", x, needs_grad=True) == "shifted"  # CPU
    assert _resolve_impl("shifted", x, needs_grad=True) == "shifted"
    if torch.cuda.is_available():
        on_gpu = x.to("cuda", torch.bfloat16)
        assert _resolve_impl("auto", on_gpu, needs_grad=True) == "triton"
        assert _resolve_impl("auto", on_gpu, needs_grad=False) == "triton"  # prefill
        assert _resolve_impl("auto", on_gpu[:, :1], needs_grad=False) == "shifted"  # a decode step
        assert _resolve_impl("auto", on_gpu.double(), needs_grad=True) == "shifted"


def test_gpu_conv_benchmark_parses_its_arguments():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "gpu_conv.py")
    spec = importlib.util.spec_from_file_location("gpu_conv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(["--out", "somewhere", "--shapes", "16x2048x3072", "--document-length", "300"])
    assert (args.out, args.shapes, args.document_length) == ("somewhere", [(16, 2048, 3072)], 300)
    assert module.parse_args([]).shapes == [(16, 2048, 3072), (16, 2048, 1792)]
    with pytest.raises(SystemExit):
        module.parse_args(["--shapes", "16x2048"])
