"""The Triton gated delta rule on correlated keys (a repeated token), against the float64 reference loop.

Random unit keys in 16+ dimensions are nearly orthogonal, so the chunk's M = diag(beta) (decay * K K^T) is small
and any way of inverting I + M passes. Repeated tokens give identical keys: M is then near a lower triangle of
beta, its powers grow like binomial coefficients, and the former inverse by repeated squaring returned garbage
(output errors of 1e6 at chunk 64, beta 0.9; found through Gated DeltaNet failing to learn MQAR on the H200)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from revival.ops.delta_rule import gated_delta_rule_reference
from revival.ops.delta_rule.triton import LaunchConfig, gated_delta_rule_triton
from tests.ops._triton_helpers import DEVICE, assert_close, run_weighted

NAMES = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "dstate0")
_run = partial(run_weighted, low=(0, 1, 2))


def _correlated_inputs(n, T, H, Dk, Dv, beta, repeat_every, seed=0):
    """Keys: one unit vector repeated, every `repeat_every`-th token a fresh random one; beta constant."""
    gen = torch.Generator().manual_seed(seed)
    k = F.normalize(torch.randn(1, 1, H, Dk, generator=gen), dim=-1).expand(n, T, H, Dk).clone()
    fresh = torch.arange(T) % repeat_every == repeat_every - 1
    k[:, fresh] = F.normalize(torch.randn(n, int(fresh.sum()), H, Dk, generator=gen), dim=-1)
    q = torch.randn(n, T, H, Dk, generator=gen)
    v = torch.randn(n, T, H, Dv, generator=gen)
    g = -0.05 * torch.rand(n, T, H, generator=gen)
    state = torch.randn(n, H, Dk, Dv, generator=gen)
    weights = (torch.randn(n, T, H, Dv, generator=gen).double(), torch.randn(n, H, Dk, Dv, generator=gen).double())
    return [q, k, v, g, torch.full((n, T, H), beta), state], weights


@pytest.mark.parametrize("chunk,beta,repeat_every,inverse_block", [
    (64, 0.9, 1000, 16), (64, 0.5, 7, 16), (32, 1.5, 1000, 16), (64, 0.9, 1000, 32), (64, 0.9, 1000, 64)])
def test_correlated_keys_match_float64_reference(chunk, beta, repeat_every, inverse_block):
    """The WY inverse by blocks of 16 (the default: 4 diagonal blocks, 3 block-row passes at chunk 64), of 32 and by
    plain substitution (one block of 64)."""
    n, T, H, Dk, Dv = 1, 80, 1, 16, 16  # one full chunk of 64 and a tail
    inputs, weights = _correlated_inputs(n, T, H, Dk, Dv, beta, repeat_every)
    ref = _run(gated_delta_rule_reference, [x.double() for x in inputs], weights, "cpu")
    launch = LaunchConfig(inverse_block=inverse_block)
    got = _run(lambda *a: gated_delta_rule_triton(*a, Dk**-0.5, chunk_size=chunk, launch=launch), inputs, weights,
               DEVICE)
    assert_close(got, ref, NAMES, 1e-4)


def test_inverse_block_is_checked():
    from revival.ops.delta_rule.triton import launch_config

    assert launch_config(128, 256, 96, torch.bfloat16).inverse_block == 16
    for bad in (8, 24, 0, 32.0):
        with pytest.raises(ValueError, match=r"^launch.inverse_block: expected a power of two >= 16, got "):
            launch_config(128, 256, 96, torch.bfloat16, LaunchConfig(inverse_block=bad))
