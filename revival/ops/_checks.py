"""Input validation shared by the ops: every error names the argument, what it got and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_floating(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Raise ValueError unless `tensor.shape` matches `expected` (None matches any size)."""
    check_floating(name, tensor)
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name}: expected shape {want}, got {shape}")


def validate_recurrence(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
                        names: tuple[str, str] = ("log_a", "b")) -> None:
    """A diagonal linear recurrence's inputs: (B, T >= 1, D) floating tensors of one shape, h0 (B, D) or None."""
    check_floating(names[0], log_a)
    if log_a.ndim != 3 or log_a.shape[1] == 0:
        raise ValueError(f"{names[0]}: expected shape (B, T, D) with T >= 1, got {tuple(log_a.shape)}")
    check_shape(names[1], b, tuple(log_a.shape))
    if h0 is not None:
        check_shape("h0", h0, (log_a.shape[0], log_a.shape[2]))
