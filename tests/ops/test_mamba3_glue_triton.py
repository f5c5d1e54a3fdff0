"""The Triton glue of Mamba-3's SISO path (`revival/ops/mamba3/glue_triton.py`) against its PyTorch references in
float64 under the CPU interpreter: outputs and every gradient, with document starts, strided x, and without D."""

from __future__ import annotations

import pytest
import torch

from revival.ops.mamba3.glue_triton import (
    combine_heads,
    combine_heads_reference,
    two_head_inputs,
    two_head_inputs_reference,
)
from tests.ops._triton_helpers import DEVICE, rel


def _grads(fn, inputs, weight):
    leaves = [t.detach().clone().to(DEVICE).requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    (out.double() * weight.to(DEVICE)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def _strided_x(n, T, H, P, gen):
    """x as the layer passes it: a column slice of a wider projection row (row stride > H * P)."""
    wide = torch.randn(n, T, H * P + 5, generator=gen, dtype=torch.float64)
    return wide[:, :, 3:3 + H * P].reshape(n, T, H, P)


@pytest.mark.parametrize("with_starts", [False, True])
@pytest.mark.parametrize("n,T,H,P", [(2, 21, 3, 8), (1, 1, 2, 16), (1, 40, 1, 12)])
def test_two_head_inputs_match_float64_reference(n, T, H, P, with_starts):
    gen = torch.Generator().manual_seed(T + P)
    x = _strided_x(n, T, H, P, gen)
    dt = torch.rand(n, T, H, generator=gen, dtype=torch.float64) + 0.05
    A = -torch.rand(H, generator=gen, dtype=torch.float64) - 0.1
    lam = torch.rand(n, T, H, generator=gen, dtype=torch.float64)
    prev_x = torch.randn(n, H, P, generator=gen, dtype=torch.float64)
    starts = None
    if with_starts:
        starts = torch.zeros(n, T, dtype=torch.bool, device=DEVICE)
        starts[:, 0] = True
        starts[-1, T // 2] = True
    weight = torch.randn(n, T, 2 * H, P, generator=gen, dtype=torch.float64)
    inputs = (x, dt, A, lam, prev_x)
    got = _grads(lambda *a: two_head_inputs(*a, document_starts=starts), inputs, weight)
    ref = _grads(lambda *a: two_head_inputs_reference(*a, starts, torch.float64), inputs, weight)
    errors = {name: rel(g, r) for name, g, r in zip(("out", "dx", "ddt", "dA", "dlam", "dprev_x"), got, ref)}
    assert max(errors.values()) < 1e-12, errors


@pytest.mark.parametrize("with_D", [True, False])
def test_combine_heads_matches_float64_reference(with_D):
    gen = torch.Generator().manual_seed(3)
    n, T, H, P = 2, 13, 3, 10
    y2 = torch.randn(n, T, 2 * H, P, generator=gen, dtype=torch.float64)
    x = _strided_x(n, T, H, P, gen)
    D = torch.randn(H, generator=gen, dtype=torch.float64) if with_D else None
    weight = torch.randn(n, T, H, P, generator=gen, dtype=torch.float64)
    inputs = (y2, x) + ((D,) if with_D else ())
    got = _grads(lambda *a: combine_heads(a[0], a[1], a[2] if with_D else None), inputs, weight)
    ref = _grads(lambda *a: combine_heads_reference(a[0], a[1], a[2] if with_D else None), inputs, weight)
    if not with_D:  # x only reaches the output through D
        assert got[2] is None and ref[2] is None
        got, ref = got[:2], ref[:2]
    errors = [rel(g, r) for g, r in zip(got, ref)]
    assert max(errors) < 1e-12, errors


def test_bfloat16_rounds_once():
    """16-bit results equal the float32 computation rounded to nearest once (x and the heads in bfloat16)."""
    gen = torch.Generator().manual_seed(4)
    n, T, H, P = 1, 17, 2, 16
    x = torch.randn(n, T, H, P, generator=gen).bfloat16().to(DEVICE)
    dt, lam = (torch.rand(n, T, H, generator=gen).to(DEVICE) for _ in range(2))
    A, prev_x = -torch.rand(H, generator=gen).to(DEVICE), torch.randn(n, H, P, generator=gen).to(DEVICE)
    got = two_head_inputs(x, dt, A, lam, prev_x)
    assert got.dtype == torch.bfloat16
    assert (got != two_head_inputs_reference(x, dt, A, lam, prev_x, None, torch.bfloat16)).float().mean() < 0.05
    y2 = torch.randn(n, T, 2 * H, P, generator=gen).bfloat16().to(DEVICE)
    D = torch.randn(H, generator=gen).to(DEVICE)
    out = combine_heads(y2, x, D)
    assert out.dtype == torch.bfloat16
    # an FMA on the GPU may move a tie by one unit; truncating instead of rounding would change about half
    assert (out != combine_heads_reference(y2, x, D)).float().mean() < 0.05


def test_bad_shapes_are_named():
    x = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="lam"):
        two_head_inputs(x, torch.ones(1, 4, 2), -torch.ones(2), torch.ones(1, 4, 3), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="y2"):
        combine_heads(torch.zeros(1, 4, 2, 8), x)
