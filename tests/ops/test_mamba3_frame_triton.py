"""Mamba-3's rotating frame as Triton kernels (`revival/ops/mamba3/frame_triton.py`) against the PyTorch pieces of
`chunkwise.rotating_frame` in float64 under the CPU interpreter without CUDA: keys, queries and the last angle, and
the gradients of dt, theta (also as the layer's stride-0 expand over heads), B, C (strided), angle0 and prev_B, with
document starts, T = 1, odd T and T not a multiple of the tile."""

from __future__ import annotations

import pytest
import torch

from revival.ops.mamba3.chunkwise import _angles
from revival.ops.mamba3.frame_triton import LaunchConfig, default_segments, rotating_frame_triton
from revival.ops.mamba3.reference import rotate
from tests.ops._triton_helpers import DEVICE, packed_starts, rel

NAMES = ("keys", "queries", "angle_last", "ddt", "dtheta", "dB", "dC", "dangle0", "dprev_B")


def _frame_reference(dt, theta, B, C, angle0, prev_B, document_starts=None):
    """What `rotating_frame` computes for the Triton path, in SSD's 2H-head layout (as `mamba3_triton` lays it)."""
    angle = _angles(angle0, dt[..., None] * theta, document_starts)
    B_rot, C_rot = rotate(B, -angle), rotate(C, -angle)
    B_prev = torch.cat([rotate(prev_B, -angle0)[:, None], B_rot[:, :-1]], dim=1)
    return torch.cat([B_rot, B_prev], dim=2), torch.cat([C_rot, C_rot], dim=2), angle[:, -1]


def _inputs(n, T, H, N, seed, shared_theta=False, strided=False):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.rand(n, T, H, generator=gen, dtype=torch.float64) * 0.5 + 0.01
    if shared_theta:  # the layer's (n, T, 1, N/2) expanded over heads: stride 0
        theta = torch.randn(n, T, 1, N // 2, generator=gen, dtype=torch.float64) * 2
    else:
        theta = torch.randn(n, T, H, N // 2, generator=gen, dtype=torch.float64) * 2
    if strided:  # the layer's B: a (n, T, 1, N) norm plus a per-head bias; here a transposed layout instead
        B = torch.randn(n, H, T, N, generator=gen, dtype=torch.float64)
        C = torch.randn(n, T, N, H, generator=gen, dtype=torch.float64)
    else:
        B = torch.randn(n, T, H, N, generator=gen, dtype=torch.float64)
        C = torch.randn(n, T, H, N, generator=gen, dtype=torch.float64)
    angle0 = torch.randn(n, H, N // 2, generator=gen, dtype=torch.float64)
    prev_B = torch.randn(n, H, N, generator=gen, dtype=torch.float64)
    weights = [torch.randn(n, T, 2 * H, N, generator=gen, dtype=torch.float64),
               torch.randn(n, T, 2 * H, N, generator=gen, dtype=torch.float64),
               torch.randn(n, H, N // 2, generator=gen, dtype=torch.float64)]
    return [dt, theta, B, C, angle0, prev_B], weights


def _views(leaves, H, shared_theta, strided):
    """The op's arguments from the leaves: theta expanded over heads, B and C permuted to (n, T, H, N)."""
    dt, theta, B, C, angle0, prev_B = leaves
    if shared_theta:
        theta = theta.expand(-1, -1, H, -1)
    if strided:
        B, C = B.permute(0, 2, 1, 3), C.permute(0, 1, 3, 2)
    return dt, theta, B, C, angle0, prev_B


def _run(fn, inputs, weights, device, H, shared_theta=False, strided=False, **options):
    leaves = [t.to(device).detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*_views(leaves, H, shared_theta, strided), **options)
    sum((out.double() * w.to(device)).sum() for out, w in zip(outputs, weights)).backward()
    return [out.detach() for out in outputs] + [leaf.grad for leaf in leaves]


def _check(inputs, weights, H, tol=1e-12, starts=None, launch=None, **layout):
    ref = _run(_frame_reference, inputs, weights, "cpu", H, document_starts=starts, **layout)
    got = _run(rotating_frame_triton, inputs, weights, DEVICE, H, launch=launch,
               document_starts=None if starts is None else starts.to(DEVICE), **layout)
    assert got[0].dtype == torch.float64 and got[0].is_contiguous()
    errors = {name: rel(g, r) for name, g, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < tol, errors
    return got


CASES = [
    # n, T, H, N, block_t
    (1, 1, 2, 16, 16),  # one token
    (2, 37, 2, 16, 16),  # odd T, a partial last tile
    (1, 45, 3, 20, 8),  # N/2 = 10 not a power of two, many tiles
    (1, 9, 1, 8, 32),  # one partial tile
]


@pytest.mark.parametrize("n,T,H,N,block_t", CASES)
def test_matches_float64_pieces(n, T, H, N, block_t):
    inputs, weights = _inputs(n, T, H, N, seed=T + N)
    _check(inputs, weights, H, launch=LaunchConfig(block_t=block_t))


def test_shared_theta_and_strided_B_C():
    """theta a stride-0 expand over heads (its gradient summed over heads by autograd), B and C transposed."""
    inputs, weights = _inputs(2, 23, 3, 16, seed=4, shared_theta=True, strided=True)
    _check(inputs, weights, 3, launch=LaunchConfig(block_t=8), shared_theta=True, strided=True)


@pytest.mark.parametrize("block_t", [8, 16])
def test_document_starts(block_t):
    """Starts at t = 0, twice in a row (a one-token document), on tile edges and at the last token; row 0 starts at
    t = 0, so angle0 reaches only prev_B's rotation there."""
    inputs, weights = _inputs(2, 40, 2, 12, seed=9)
    _check(inputs, weights, 2, starts=packed_starts(), launch=LaunchConfig(block_t=block_t))


@pytest.mark.parametrize("segments,with_starts", [(3, False), (20, True)])
def test_segments_match_float64_pieces(segments, with_starts):
    """T split into segments that run in parallel (the B = 1 long-context path; 20 tiles of 2): 3 uneven segments of
    several tiles without starts (angle0 and d angle_last cross every segment), 20 with starts: more than one block
    (16) of the carry between segments (one segment, the single walk, is every other test here)."""
    inputs, weights = _inputs(2, 40, 2, 12, seed=11)
    _check(inputs, weights, 2, starts=packed_starts() if with_starts else None,
           launch=LaunchConfig(block_t=2, segments=segments))


def test_default_segments():
    """One walk while batch*heads fill the SMs (125M at 2k: 16 x 24 rows), 4 programs per SM when they do not
    (B = 1 at 32k: 24 rows -> 22 segments), never more than the tiles."""
    assert default_segments(384, 64, 132) == 1
    assert default_segments(24, 1024, 132) == 22
    assert default_segments(2, 5, 132) == 5


def test_float32_matches_float64():
    inputs, weights = _inputs(1, 50, 2, 16, seed=2)
    ref = _run(_frame_reference, inputs, weights, "cpu", 2)
    got = _run(rotating_frame_triton, [t.float() for t in inputs], weights, DEVICE, 2)
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.float32
    errors = {name: rel(g, r) for name, g, r in zip(NAMES, got, ref)}
    assert max(errors.values()) < 1e-5, errors


def test_bad_arguments_are_named():
    inputs, _ = _inputs(1, 4, 2, 8, seed=0)
    dt, theta, B, C, angle0, prev_B = (t.to(DEVICE) for t in inputs)
    with pytest.raises(ValueError, match="theta: expected shape"):
        rotating_frame_triton(dt, theta[..., :3], B, C, angle0, prev_B)
    with pytest.raises(ValueError, match="launch: expected a LaunchConfig"):
        rotating_frame_triton(dt, theta, B, C, angle0, prev_B, launch=32)
    with pytest.raises(ValueError, match="launch.segments: expected None or an int"):
        rotating_frame_triton(dt, theta, B, C, angle0, prev_B, launch=LaunchConfig(segments=0))


def test_mamba3_triton_with_the_layers_layouts():
    """The whole SISO Triton path on the layer's layouts (theta expanded over heads, B and C a broadcast sum of a
    per-token vector and a per-head bias) with document starts, against the float64 reference loop."""
    from revival.ops.mamba3 import mamba3_reference
    from revival.ops.mamba3.triton import mamba3_triton

    gen = torch.Generator().manual_seed(21)
    n, T, H, P, N = 2, 40, 3, 16, 16
    x = torch.randn(n, T, H, 1, P, generator=gen)
    dt = torch.rand(n, T, H, generator=gen) * 0.5 + 0.01
    A = -torch.rand(H, generator=gen) * 2 - 0.1
    lam = torch.rand(n, T, H, generator=gen)
    B = torch.randn(n, T, 1, 1, N, generator=gen) + torch.randn(H, 1, N, generator=gen)
    C = torch.randn(n, T, 1, 1, N, generator=gen) + torch.randn(H, 1, N, generator=gen)
    theta = (torch.randn(n, T, 1, N // 2, generator=gen) * 2).expand(n, T, H, N // 2)
    state = (torch.randn(n, H, N // 2, generator=gen), torch.randn(n, H, P, N, generator=gen),
             torch.randn(n, H, 1, N, generator=gen), torch.randn(n, H, 1, P, generator=gen))
    starts = packed_starts()
    ref = mamba3_reference(*(t.double() for t in (x, dt, A, lam, B, C, theta)), None,
                           tuple(s.double() for s in state), document_starts=starts)
    y, got = mamba3_triton(*(t.to(DEVICE) for t in (x, dt, A, lam, B, C, theta)), None,
                           tuple(s.to(DEVICE) for s in state), chunk_size=16, document_starts=starts.to(DEVICE))
    assert rel(y, ref[0]) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(got, ref[1]))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the compiled kernels' cos/sin at large angles")
def test_float32_at_a_real_shape_on_the_gpu():
    """(2, 2048, 8, N=64) with angles growing to ~1e3 rad and rare documents: the float32 kernels' error against float64
    within 3x that of the float32 PyTorch pieces (the angle's rounding dominates both: 1.5-1.9x at T = 512 under the
    interpreter, the kernel's carry summing sequentially)."""
    inputs, weights = _inputs(2, 2048, 8, 64, seed=3)
    inputs[1] = inputs[1].abs()  # angles that grow with t
    starts = torch.rand(2, 2048, generator=torch.Generator().manual_seed(4)) < 1 / 500
    ref = _run(_frame_reference, inputs, weights, "cuda", 8, document_starts=starts.cuda())
    torch32 = _run(_frame_reference, [t.float() for t in inputs], weights, "cuda", 8, document_starts=starts.cuda())
    got = _run(rotating_frame_triton, [t.float() for t in inputs], weights, "cuda", 8, document_starts=starts.cuda())
    errors = {name: (rel(g, r), rel(p, r)) for name, g, p, r in zip(NAMES, got, torch32, ref)}
    assert all(kernel <= 3 * pytorch + 1e-6 for kernel, pytorch in errors.values()), errors


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the 125M Mamba-3 shape at batch 1, 32k tokens")
@pytest.mark.parametrize("segments", [1, None])
def test_float32_at_batch_1_32k_on_the_gpu(segments):
    """(1, 32768, 24, N=64), the shape where T is split into segments (None: 22 on an H200; 1: the single walk), with
    angles growing to ~1e4 rad and rare documents: within 3x the float32 PyTorch pieces' error against float64."""
    inputs, weights = _inputs(1, 32768, 24, 64, seed=5)
    inputs[1] = inputs[1].abs()
    starts = (torch.rand(1, 32768, generator=torch.Generator().manual_seed(6)) < 1 / 5000).cuda()
    ref = _run(_frame_reference, inputs, weights, "cuda", 24, document_starts=starts)
    torch32 = _run(_frame_reference, [t.float() for t in inputs], weights, "cuda", 24, document_starts=starts)
    got = _run(rotating_frame_triton, [t.float() for t in inputs], weights, "cuda", 24, document_starts=starts,
               launch=LaunchConfig(segments=segments))
    errors = {name: (rel(g, r), rel(p, r)) for name, g, p, r in zip(NAMES, got, torch32, ref)}
    assert all(kernel <= 3 * pytorch + 1e-6 for kernel, pytorch in errors.values()), errors
