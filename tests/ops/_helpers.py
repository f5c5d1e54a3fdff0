"""Checks the op tests (PyTorch paths) share."""

from __future__ import annotations

import torch


def check_float32_and_bfloat16(op, reference, inputs: list[torch.Tensor]) -> None:
    """`op` on float32 copies of the float64 `inputs`: float32 output and state within 1e-5 of `reference`; on
    bfloat16 copies: a bfloat16 output and a float32 state."""
    out_ref, state_ref = reference(*inputs)
    out, state = op(*[t.float() for t in inputs])
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    for got, want in ((out, out_ref), (state, state_ref)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    out, state = op(*[t.bfloat16() for t in inputs])
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
