"""The linear recurrence x_t = A_t x_{t-1} + b_t (x_0 = 0) by a parallel scan over (A, b) pairs (docs/math.md).

Each Newton step and the backward pass solve one such recurrence. Two structures:

    "diagonal": A (B, T, *S) elementwise, b (B, T, *S)        (also the diagonal of a block Jacobian: quasi-DEER)
    "block":    A (B, T, G, k, k) one k x k block per group, b (B, T, G, k)
                (ParaLSTM: G = units, k = 2; the sLSTM: G = heads, k = 3 * head_dim; a dense cell: G = 1)

The pairs compose associatively, (A1, b1) then (A2, b2) -> (A2 A1, A2 b1 + b2), so the prefix solves in
ceil(log2 T) doubling rounds (Hillis-Steele: O(T log T) work, O(log T) depth). `reverse=True` solves the backward
recurrence x_t = A_t x_{t+1} + b_t (x_{T+1} = 0), the adjoint of the forward one when A_t is J_{t+1}^T.
`linear_scan_reference` beside it is the plain loop the tests compare against.
"""

from __future__ import annotations

import torch

__all__ = ["STRUCTURES", "linear_scan", "linear_scan_reference"]

STRUCTURES = ("diagonal", "block")


def _check(coeff: torch.Tensor, rhs: torch.Tensor, structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structure: expected one of {STRUCTURES}, got {structure!r}")
    if structure == "diagonal" and coeff.shape != rhs.shape:
        raise ValueError(f"coeff: expected the shape of rhs {tuple(rhs.shape)} (diagonal), got {tuple(coeff.shape)}")
    if structure == "block":
        want = (*rhs.shape, rhs.shape[-1])
        if rhs.ndim != 4 or tuple(coeff.shape) != want:
            raise ValueError(f"coeff: expected shape (B, T, G, k, k) = {want} for rhs (B, T, G, k) "
                             f"{tuple(rhs.shape)} (block), got {tuple(coeff.shape)}")


def _apply(coeff: torch.Tensor, x: torch.Tensor, structure: str) -> torch.Tensor:
    if structure == "diagonal":
        return coeff * x
    return (coeff @ x.unsqueeze(-1)).squeeze(-1)


def _compose(later: torch.Tensor, earlier: torch.Tensor, structure: str) -> torch.Tensor:
    return later * earlier if structure == "diagonal" else later @ earlier


def linear_scan(coeff: torch.Tensor, rhs: torch.Tensor, *, structure: str, reverse: bool = False) -> torch.Tensor:
    """Solve x_t = coeff_t x_{t-1} + rhs_t for t = 1..T from x_0 = 0 (reverse: x_t = coeff_t x_{t+1} + rhs_t).

    Time is dim 1. Returns x in rhs' shape and dtype. Works on any device (PyTorch ops); no autograd graph is kept
    through the doubling rounds' in-place updates, so call it on tensors that need no gradient (the solver does).
    """
    _check(coeff, rhs, structure)
    if reverse:
        return linear_scan(coeff.flip(1), rhs.flip(1), structure=structure).flip(1)
    T = rhs.shape[1]
    if structure == "block" and rhs.shape[-1] == 2:
        return _block2_scan(coeff, rhs)
    x, a = rhs.clone(), coeff.clone()
    offset = 1
    while offset < T:
        # x_t += A_t x_{t-offset}: x now holds the sum over the last 2*offset steps; then A_t <- A_t A_{t-offset}
        x[:, offset:] = x[:, offset:] + _apply(a[:, offset:], x[:, :-offset], structure)
        if 2 * offset < T:
            a[:, offset:] = _compose(a[:, offset:], a[:, :-offset], structure)
        offset *= 2
    return x


def _block2_scan(coeff: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """`linear_scan` for 2 x 2 blocks (ParaLSTM) with each matrix entry and state component its own contiguous
    (B, T, G) tensor: elementwise products instead of batched 2 x 2 matmuls (~7x faster on CPU, docs/kernels.md)."""
    T = rhs.shape[1]
    x = [rhs[..., i].clone() for i in range(2)]
    a = [[coeff[..., i, j].clone() for j in range(2)] for i in range(2)]
    offset = 1
    while offset < T:
        now, before = slice(offset, None), slice(None, -offset)
        earlier = [x[0][:, before], x[1][:, before]]
        updated = [x[i][:, now] + a[i][0][:, now] * earlier[0] + a[i][1][:, now] * earlier[1] for i in range(2)]
        for i in range(2):
            x[i][:, now] = updated[i]
        if 2 * offset < T:
            composed = [[a[i][0][:, now] * a[0][j][:, before] + a[i][1][:, now] * a[1][j][:, before]
                         for j in range(2)] for i in range(2)]
            for i in range(2):
                for j in range(2):
                    a[i][j][:, now] = composed[i][j]
        offset *= 2
    return torch.stack(x, dim=-1)


def linear_scan_reference(coeff: torch.Tensor, rhs: torch.Tensor, *, structure: str,
                          reverse: bool = False) -> torch.Tensor:
    """The same recurrence as `linear_scan`, one step at a time."""
    _check(coeff, rhs, structure)
    steps = range(rhs.shape[1] - 1, -1, -1) if reverse else range(rhs.shape[1])
    x, out = torch.zeros_like(rhs[:, 0]), torch.empty_like(rhs)
    for t in steps:
        x = _apply(coeff[:, t], x, structure) + rhs[:, t]
        out[:, t] = x
    return out
