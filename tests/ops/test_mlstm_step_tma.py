"""The mLSTM step's "bulk" variant (C moved by tensor descriptors: TMA on Hopper) against the float64 reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), which executes tensor descriptor loads and
stores with the same per-dimension bounds (zero fill on load, clipped store), at small shapes.
"""

from __future__ import annotations

import pytest
import torch

from revival.ops.mlstm import mlstm_step
from revival.ops.mlstm.triton import mlstm_step_triton
from tests.ops._triton_helpers import DEVICE, rel  # skips this module without triton


def _bulk(**launch):
    from revival.ops.mlstm.triton.step import StepLaunch  # imports triton: after the skip

    return StepLaunch(variant="bulk", **launch)


def _step_case(B, H, Dk, Dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = [rand(B, H, Dk).to(dtype), rand(B, H, Dk).to(dtype), rand(B, H, Dv).to(dtype), rand(B, H), rand(B, H) + 2.0]
    state = (rand(B, H, Dk, Dv), rand(B, H, Dk), rand(B, H))
    ref = mlstm_step(*(t.double() for t in x), tuple(s.double() for s in state))
    return [t.to(DEVICE) for t in x], tuple(s.to(DEVICE) for s in state), ref


def _errors(got, ref):
    return {name: rel(g, r) for name, g, r in zip("hCnm", (got[0], *got[1]), (ref[0], *ref[1]))}


@pytest.mark.parametrize("shape,launch", [
    ((2, 3, 20, 40), dict(block_k=8, block_v=16, num_stages=2)),  # tails: Dk 20 = 2 x 8 + 4, Dv 40 = 2 x 16 + 8
    ((1, 2, 100, 72), dict(block_k=32, block_v=64, num_stages=3)),  # batch 1, the probe's tile, 4 Dk blocks
    ((1, 1, 24, 4), dict(block_k=16, block_v=4, num_stages=2)),  # the narrowest C rows TMA takes (16 bytes)
])
def test_bulk_step_matches_reference(shape, launch):
    x, state, ref = _step_case(*shape, torch.float32, seed=sum(shape))
    got = mlstm_step_triton(*x, state, launch=_bulk(**launch))
    assert got[0].dtype == torch.float32 and got[1][0].dtype == torch.float32
    errors = _errors(got, ref)
    assert max(errors.values()) < 1e-5, errors


def test_bulk_step_writes_into_out_and_updates_C_in_place():
    x, state, ref = _step_case(2, 3, 20, 40, torch.bfloat16, seed=5)
    C_in = state[0].clone()
    out = (torch.empty_like(x[2]), C_in, torch.empty_like(state[1]), torch.empty_like(state[2]))
    got = mlstm_step_triton(*x, (C_in, *state[1:]), launch=_bulk(block_k=8, block_v=16), out=out)
    assert got[0] is out[0] and all(a is b for a, b in zip(got[1], out[1:]))
    errors = _errors(got, ref)
    assert errors["h"] < 1e-2 and max(errors[n] for n in "Cnm") < 1e-5, errors


def test_bulk_step_errors_name_the_argument():
    with pytest.raises(ValueError, match="block_v: variant 'bulk' needs >= 4"):
        _bulk(block_v=2)
    x, state, _ = _step_case(1, 2, 16, 6, torch.float32, seed=0)
    with pytest.raises(ValueError, match="v: variant 'bulk' needs Dv a multiple of 4 .* got Dv=6"):
        mlstm_step_triton(*x, state, launch=_bulk(block_k=8, block_v=8))
    x, state, _ = _step_case(1, 2, 16, 8, torch.float32, seed=0)
    C_off = torch.empty(state[0].numel() + 1, device=DEVICE)[1:].view(state[0].shape)  # 4 bytes off alignment
    C_off.copy_(state[0])
    with pytest.raises(ValueError, match=r"state \(C\): variant 'bulk' needs a 16-byte aligned address"):
        mlstm_step_triton(*x, (C_off, *state[1:]), launch=_bulk(block_k=8, block_v=8))
