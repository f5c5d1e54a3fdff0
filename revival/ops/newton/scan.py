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
    x, a = rhs.clone(), coeff.clone()
    offset = 1
    while offset < T:
        # x_t += A_t x_{t-offset}: x now holds the sum over the last 2*offset steps; then A_t <- A_t A_{t-offset}
        x[:, offset:] = x[:, offset:] + _apply(a[:, offset:], x[:, :-offset], structure)
        if 2 * offset < T:
            a[:, offset:] = _compose(a[:, offset:], a[:, :-offset], structure)
        offset *= 2
    return x


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
