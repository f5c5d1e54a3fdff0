"""Several `nn.Linear` layers that read the same input, run as one matrix product when the input has many rows.

One wide product (weights concatenated per call) instead of N narrow ones: one read and, under autocast, one cast of
the input, one input-gradient product in the backward instead of N plus N - 1 additions. For few rows (decoding) the
concatenation would copy every weight per step, which costs more than it saves, so the layers run one by one.
Without autograd and autocast (inference) nothing is concatenated: each layer's product writes its columns of one
output (a strided `out=`), so the outputs are still views of one tensor and no weight is copied; a copy of the weights
per call costs as much as the products themselves when the rows are few (a 2k-token prefill of a 1.3B model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_concat", "linear_many"]

# Inputs with at least this many rows (all leading dims together) take the concatenated product
FUSE_MIN_ROWS = 256


def linear_many(x: torch.Tensor, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """[linear(x) for linear in linears], as one product when x has >= FUSE_MIN_ROWS rows (the outputs are then
    views into one tensor). The layers must all have a bias or all have none."""
    if x.shape[:-1].numel() < FUSE_MIN_ROWS:
        return [linear(x) for linear in linears]
    return list(_concatenated_product(x, linears).split([linear.out_features for linear in linears], dim=-1))


def linear_concat(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """torch.cat([linear(x) for linear in linears], dim=-1), as one product when x has >= FUSE_MIN_ROWS rows (for
    fewer rows, the layers one by one and a copy of their small outputs)."""
    if x.shape[:-1].numel() < FUSE_MIN_ROWS:
        return torch.cat([linear(x) for linear in linears], dim=-1)
    return _concatenated_product(x, linears)


def _concatenated_product(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    biases = [linear.bias for linear in linears]
    if any(b is None for b in biases) != all(b is None for b in biases):
        raise ValueError("linears: expected all layers with a bias or all without")
    if not _needs_autograd_or_autocast(x, linears):
        return _products_into_one_output(x, linears)
    weight = torch.cat([linear.weight for linear in linears])
    bias = None if biases[0] is None else torch.cat(biases)
    return F.linear(x, weight, bias)


def _needs_autograd_or_autocast(x: torch.Tensor, linears: list[nn.Linear]) -> bool:
    if torch.is_autocast_enabled(x.device.type):
        return True
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for linear in linears for p in linear.parameters())


def _products_into_one_output(x: torch.Tensor, linears: list[nn.Linear]) -> torch.Tensor:
    """The concatenated product without concatenating weights: each layer's x @ W^T (+ b) into its column block."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], sum(linear.out_features for linear in linears), device=x.device,
                      dtype=torch.result_type(rows, linears[0].weight))
    start = 0
    for linear in linears:
        block = out[:, start:start + linear.out_features]
        if linear.bias is None:
            torch.mm(rows, linear.weight.t(), out=block)
        else:
            torch.addmm(linear.bias, rows, linear.weight.t(), out=block)
        start += linear.out_features
    return out.view(*x.shape[:-1], out.shape[-1])
