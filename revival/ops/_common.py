"""Small helpers every op uses: the computation dtype and the choice between a fused kernel and its reference."""

from __future__ import annotations

import torch

FUSED_IMPLS = ("auto", "triton", "reference")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the recurrences compute in: float64 for float64 inputs (the references' checks), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def use_fused_kernel(impl: str, supported: bool, worth_it: bool, why_not: str) -> bool:
    """Whether an elementwise op runs its Triton kernel. impl "auto": where `supported` (Triton, device, dtype) and
    `worth_it` (large enough to beat PyTorch's passes); "triton": where supported, else ValueError naming `why_not`;
    "reference": never."""
    if not isinstance(impl, str) or impl not in FUSED_IMPLS:
        raise ValueError(f"impl: expected one of {FUSED_IMPLS}, got {impl!r}")
    if impl == "triton" and not supported:
        raise ValueError(f"impl: 'triton' cannot run here ({why_not}); use 'auto' or 'reference'")
    return impl == "triton" or (impl == "auto" and supported and worth_it)


def chunk_spans(T: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(start, stop, chunk length) of the chunkwise forms' two passes: all full chunks, then the tail as one shorter
    chunk (lengths that are not a multiple of the chunk are handled exactly, never padded); empty passes left out."""
    full = (T // chunk_size) * chunk_size
    return [(start, stop, L) for start, stop, L in ((0, full, chunk_size), (full, T, T - full)) if stop > start]
