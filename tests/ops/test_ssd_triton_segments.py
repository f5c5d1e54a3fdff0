"""Segmented walks of the Triton SSD kernels (`LaunchConfig.segments`) and the skip term D inside them, against the
float64 reference loop under the CPU interpreter (small shapes)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from revival.ops.ssd import ssd_reference
from revival.ops.ssd.triton import LaunchConfig, ssd_triton
from revival.ops.ssd.triton.config import default_segments, launch_config
from tests.ops._triton_helpers import DEVICE, assert_close, check_packed_documents, rel
from tests.ops.test_ssd_triton import LOW, NAMES, _inputs, _reference, _run

NARROW = dict(block_p_states=16, block_p_dstates=16, block_p_dx=16, block_p_grads=16, block_n_grads=16)


@pytest.mark.parametrize("segments", [1, 2, 3, 5])
def test_segments_match_float64_reference(segments):
    """T = 77 at chunk 16: 5 chunks, the last partial; 2 segments of 3 + 2 chunks, 3 of 2 + 2 + 1, 5 of one. Two P-
    tiles in the walks, groups; outputs, final state and every gradient (initial state and D included)."""
    inputs, weights = _inputs(2, 77, 4, 32, 2, 24, seed=21)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(segments=segments, **NARROW)
    got = _run(lambda *a: ssd_triton(*a, chunk_size=16, launch=launch), inputs, weights, DEVICE)
    assert_close(got, ref, NAMES, 1e-5)


def test_more_segments_than_chunks_and_the_default():
    """segments 9 over 3 chunks walks 3 segments of one; the default (2 batch*heads, 3 chunks) one segment."""
    inputs, weights = _inputs(1, 40, 2, 16, 1, 16, seed=2)
    ref = _reference(inputs, weights)
    for launch in (LaunchConfig(segments=9), None):
        got = _run(partial(ssd_triton, chunk_size=16, launch=launch), inputs, weights, DEVICE)
        assert_close(got, ref, NAMES, 1e-5)


@pytest.mark.parametrize("segments", [2, 3])
def test_segments_with_document_starts(segments):
    """Packed rows (starts at t = 0, twice in a row, on chunk boundaries 16 and 32, at the last token; one inside a
    chunk): a chunk with a start passes no state on, also across a segment boundary."""
    inputs, weights = _inputs(2, 40, 4, 16, 2, 24, seed=13)
    kernel = partial(ssd_triton, chunk_size=16, launch=LaunchConfig(segments=segments))
    check_packed_documents(ssd_reference, kernel, inputs, weights, NAMES)


def test_segments_state_carry_equals_one_pass():
    """The final state of a segmented call carried into a second one equals one pass over the whole sequence."""
    inputs, _ = _inputs(1, 90, 2, 16, 1, 16, seed=4)
    x, dt, A, B, C, D, S = (t.to(DEVICE) for t in inputs)
    launch = LaunchConfig(segments=3)
    y_full, s_full = ssd_triton(x, dt, A, B, C, D, S, chunk_size=16)
    y1, s = ssd_triton(x[:, :53], dt[:, :53], A, B[:, :53], C[:, :53], D, S, chunk_size=16, launch=launch)
    y2, s = ssd_triton(x[:, 53:], dt[:, 53:], A, B[:, 53:], C[:, 53:], D, s, chunk_size=16, launch=launch)
    assert rel(torch.cat([y1, y2], 1), y_full) < 1e-5 and rel(s, s_full) < 1e-5


def test_segments_bfloat16():
    inputs, weights = _inputs(1, 70, 2, 16, 1, 32, seed=5)
    ref = _reference([t.bfloat16() if i in LOW else t for i, t in enumerate(inputs)], weights)
    launch = LaunchConfig(segments=3)
    got = _run(lambda *a: ssd_triton(*a, chunk_size=16, launch=launch), inputs, weights, DEVICE, dtype=torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    assert_close(got, ref, NAMES, 1e-2)


def test_without_skip_term_every_gradient():
    """D None: the kernels' HAS_D paths off; outputs and gradients (no D gradient) against float64."""
    inputs, weights = _inputs(1, 45, 2, 16, 1, 16, seed=8)
    inputs = inputs[:5] + [inputs[6]]
    ref = _run(lambda *a: ssd_reference(*a[:5], None, a[5]), [t.double() for t in inputs], weights, "cpu")
    launch = LaunchConfig(segments=2)
    got = _run(lambda *a: ssd_triton(*a[:5], None, a[5], chunk_size=16, launch=launch), inputs, weights, DEVICE)
    assert_close(got, ref, [n for n in NAMES if n != "dD"], 1e-5)


def test_skip_term_without_its_gradient():
    """D given without requires_grad (the dC kernel's D-gradient path off): y, dx still include D."""
    inputs, weights = _inputs(1, 37, 2, 16, 1, 32, seed=3)
    D = inputs[5].to(DEVICE)
    ref = _run(lambda *a: ssd_reference(*a[:5], D.double().cpu(), a[5]), [t.double() for t in inputs[:5]]
               + [inputs[6].double()], weights, "cpu")
    got = _run(lambda *a: ssd_triton(*a[:5], D, a[5], chunk_size=16), inputs[:5] + [inputs[6]], weights, DEVICE)
    assert_close(got, ref, [n for n in NAMES if n != "dD"], 1e-5)


def test_walk_segments_need_the_correction():
    """The raw segmented walk differs from the one-segment walk after the first segment (each segment starts from
    zero), and the carry plus the correction S + prefix_c S_j make it equal: forwards and in reverse."""
    from revival.ops.ssd.triton.forward import walk_chunks

    inputs, _ = _inputs(1, 80, 2, 16, 1, 16, seed=6)
    x, dt, A, B, C, D, S = (t.to(DEVICE) for t in inputs)
    S = S.reshape(2, 16, 16)
    for reverse in (False, True):
        one, last_one, none = walk_chunks(x, dt, A, B, None, S, 16, 16, 4, reverse, 1)
        raw, last, (prefix, entering) = walk_chunks(x, dt, A, B, None, S, 16, 16, 4, reverse, 3)
        assert none is None and rel(last, last_one) < 1e-5
        first_walked = slice(4, 5) if reverse else slice(0, 2)  # segments of 2, 2, 1 chunks
        assert rel(raw[:, first_walked], one[:, first_walked]) < 1e-6
        assert rel(raw, one) > 1e-2
        segment = torch.arange(5, device=raw.device) // 2
        corrected = raw + prefix[:, :, None, None] * entering[:, segment]
        assert rel(corrected, one) < 1e-5


def test_default_segments_and_a_bad_request():
    assert default_segments(384, 32) == 1 and default_segments(64, 512) == 1  # the chip already full
    assert default_segments(24, 512) == 5 and default_segments(48, 512) == 2  # ~96-128 rows x segments
    assert default_segments(24, 40) == 2 and default_segments(1, 20) == 1  # segments of >= 16 chunks
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"^launch.segments: expected an int >= 1 or None, got"):
            launch_config(16, 16, 2, LaunchConfig(segments=bad))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA: the compiled segmented kernels at a real shape (Hopper)")
def test_segments_at_a_real_shape_on_the_gpu():
    """bfloat16 at (1, 4096, 8, P=64, G=1, N=128), 64 chunks in 4 segments, with document starts: every gradient
    within 2e-2 of float64 (the reference loop on the GPU)."""
    inputs, weights = _inputs(1, 4096, 8, 64, 1, 128, seed=12, dt_scale=0.02)  # weak decay: carried states matter
    starts = torch.zeros(1, 4096, dtype=torch.bool)
    starts[0, [1500, 2048]] = True  # inside segment 1, and on the boundary of segments 1 and 2
    rounded = [t.bfloat16() if i in LOW else t for i, t in enumerate(inputs)]
    ref = _run(lambda *a: ssd_reference(*a, document_starts=starts.cuda()), [t.double() for t in rounded], weights,
               "cuda")
    launch = LaunchConfig(segments=4)
    got = _run(lambda *a: ssd_triton(*a, document_starts=starts.cuda(), launch=launch), inputs, weights, "cuda",
               dtype=torch.bfloat16)
    assert_close(got, ref, NAMES, 2e-2)
