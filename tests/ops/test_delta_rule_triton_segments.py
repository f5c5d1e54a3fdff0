"""The gated delta rule's sequential walks in segments (forward.py `segmented_walk`) against the float64 reference
loop, under TRITON_INTERPRET=1 without CUDA: every segment count must give the one-walk result."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from revival.ops.delta_rule import gated_delta_rule_reference
from revival.ops.delta_rule.triton import LaunchConfig, gated_delta_rule_triton, launch_config
from revival.ops.delta_rule.triton.config import default_segments
from revival.ops.delta_rule.triton.forward import segments_of
from tests.ops._triton_helpers import DEVICE, assert_close, check_packed_documents
from tests.ops.test_delta_rule_triton import NAMES, _inputs, _reference, _run


@pytest.mark.parametrize("segments", [2, 3, 7])
def test_segmented_walks_match_float64_reference(segments):
    """T = 100 in chunks of 16: 7 chunks, so 3 segments are 3 + 3 + 1 chunks and 7 one chunk each (the last chunk
    partial); beta up to 2, Dv over two tiles and Dk over one; weak decay (g >= -0.1), so that what a segment
    carries into the next one matters. Outputs, final state and every gradient."""
    inputs, weights = _inputs(1, 100, 2, 16, 24, seed=5 + segments, beta_max=2.0, g_scale=0.1)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(segments=segments, block_v_states=16, block_v_dstates=32)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 0.25, chunk_size=16, launch=launch), inputs, weights, DEVICE)
    assert_close(got, ref, NAMES, 1e-5)


def test_segmented_walks_with_a_transition_over_several_tiles():
    """Dk = 40 over 32-wide tiles: the transition walk (Dk x Dk) spans two column tiles with a masked tail."""
    inputs, weights = _inputs(2, 50, 1, 40, 16, seed=11, g_scale=0.1)
    ref = _reference(inputs, weights)
    launch = LaunchConfig(segments=2, block_v_states=32, block_v_dstates=32)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 40**-0.5, chunk_size=16, launch=launch), inputs, weights,
               DEVICE)
    assert_close(got, ref, NAMES, 1e-5)


def test_segmented_walks_with_document_starts():
    """Packed documents across segment boundaries (segments of one chunk: every start is in or at a segment)."""
    inputs, weights = _inputs(2, 40, 2, 16, 24, seed=13, beta_max=2.0, g_scale=0.1)
    kernel = partial(gated_delta_rule_triton, scale=0.25, chunk_size=16, launch=LaunchConfig(segments=3))
    check_packed_documents(gated_delta_rule_reference, kernel, inputs, weights, NAMES)


def test_segment_counts():
    assert segments_of(512, 16) == (16, 32)
    assert segments_of(7, 3) == (3, 3)
    assert segments_of(7, 6) == (4, 2)  # spans of 2 chunks: 4 segments are enough
    assert segments_of(3, 10) == (3, 1)
    assert segments_of(5, 1) == (1, 5)
    # the 2k training shape (96 rows) walks once; batch 1 at 32k (6 rows, 512 chunks) in 21 segments
    assert default_segments(96, 32) == 1 and default_segments(6, 512) == 21 and default_segments(6, 8) == 1
    assert launch_config(128, 256, 6, torch.bfloat16, chunks=512).block_v_dstates == 64  # 126 rows' tiles
    with pytest.raises(ValueError, match=r"^launch.segments: expected an integer >= 1, got 0$"):
        launch_config(128, 256, 6, torch.bfloat16, LaunchConfig(segments=0))


@pytest.mark.skipif(DEVICE != "cuda", reason="the 16-bit operand rounding and sm_90 code paths need CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_segmented_walks_at_a_real_shape_on_the_gpu(dtype):
    """(1, 2048, 2, 128, 256) in 4 segments of 8 chunks, beta up to 2: every gradient within 2e-2 (bfloat16) or 1e-3
    (float32) of float64, as the one-walk kernels (test_delta_rule_triton.py's real-shape test)."""
    inputs, weights = _inputs(1, 2048, 2, 128, 256, seed=17, beta_max=2.0)
    rounded = [x.to(dtype).double() if index < 3 else x.double() for index, x in enumerate(inputs)]
    ref = _run(gated_delta_rule_reference, rounded, weights, "cuda")
    launch = LaunchConfig(segments=4)
    got = _run(lambda *a: gated_delta_rule_triton(*a, 128**-0.5, launch=launch), inputs, weights, "cuda",
               dtype=dtype)
    assert_close(got, ref, NAMES, 2e-2 if dtype == torch.bfloat16 else 1e-3)
