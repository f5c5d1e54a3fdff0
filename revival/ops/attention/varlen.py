"""Packed rows through a per-document attention kernel: flash attention's varlen form (`cu_seqlens`), on CUDA.

The SDPA path with a (B, 1, T, T) block-diagonal mask (`causal_attention(..., impl="sdpa")`, the reference) cannot
use the flash kernel and computes every masked block; here the B rows are flattened into one sequence of B * T
tokens cut at every document start (and at every row's t = 0), and `torch.nn.attention.varlen.varlen_attn` runs
causal attention inside each document only. Cost: two host syncs per call (the number of documents and the longest
one size the kernel's grid), as for any cu_seqlens kernel.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

__all__ = ["document_bounds", "varlen_attention_reference", "document_attention_varlen", "varlen_supported"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # flash attention's


def document_bounds(document_starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, T) bool -> (cu_seqlens (N + 1,) int32, the longest document's length) of the B * T flattened tokens:
    a document begins at every start and at every row's t = 0 (a first document without a start continues no
    cache here)."""
    B, T = document_starts.shape
    begins = document_starts.clone()
    begins[:, 0] = True
    first_tokens = torch.nonzero(begins.flatten()).flatten()
    end = torch.full((1,), B * T, dtype=first_tokens.dtype, device=first_tokens.device)
    cu_seqlens = torch.cat([first_tokens, end]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def varlen_attention_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, 0),
                               enable_gqa=False):
    """`varlen_attn`'s contract for causal self-attention (q (N, Hq, hd), k, v (N, Hkv, hd), the same documents
    for queries and keys), one SDPA call per document: the kernel's reference (any device and dtype; tests)."""
    if window_size != (-1, 0) or not torch.equal(cu_seq_q, cu_seq_k):
        raise ValueError(f"window_size: only causal self-attention (-1, 0) here, got {window_size}")
    bounds = cu_seq_q.tolist()
    outputs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:stop].transpose(0, 1) for x in (q, k, v))  # (H, n, hd)
        outputs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=enable_gqa))
    return torch.cat(outputs, dim=1).transpose(0, 1)


def varlen_supported(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """None if the flash varlen kernel takes these inputs, else why not (one line)."""
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got device {q.device.type}"
    if q.dtype not in KERNEL_DTYPES:
        return f"needs float16/bfloat16 inputs, got {q.dtype}"
    hd = q.shape[-1]
    if hd > 256 or hd % 8 or v.shape[-1] != hd:
        return f"needs a head dim <= 256, a multiple of 8, equal for q and v; got {hd} and {v.shape[-1]}"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return "this torch has no torch.nn.attention.varlen"
    if not _kernel_arguments(varlen_attn) & {"window_size", "is_causal"}:
        return "this torch's varlen_attn takes neither window_size nor is_causal"
    return None


@functools.cache
def _kernel_arguments(kernel) -> frozenset[str]:
    """The keyword arguments a `varlen_attn` takes: its signature changed between torch releases (2.9: is_causal;
    2.11: window_size, no enable_gqa; 2.12: both window_size and enable_gqa)."""
    return frozenset(inspect.signature(kernel).parameters)


def document_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_starts: torch.Tensor,
                              *, kernel=None) -> torch.Tensor:
    """Causal attention within each document of packed rows. q (B, Hq, T, hd), k, v (B, Hkv, T, hd) (queries and
    keys the same T positions), document_starts (B, T) bool. Returns (B, Hq, T, hd) like `causal_attention`.
    `kernel`: a function with `varlen_attn`'s signature (None: `varlen_attn`; tests pass
    `varlen_attention_reference`)."""
    if kernel is None:
        from torch.nn.attention.varlen import varlen_attn as kernel
    B, Hq, T, hd = q.shape
    cu_seqlens, longest = document_bounds(document_starts)
    accepted = _kernel_arguments(kernel)
    options = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    if k.shape[1] != Hq:
        if "enable_gqa" in accepted:
            options["enable_gqa"] = True
        else:  # a kernel without grouped-query heads: each kv head serves Hq // Hkv query heads, as in SDPA
            k = k.repeat_interleave(Hq // k.shape[1], dim=1)
            v = v.repeat_interleave(Hq // v.shape[1], dim=1)

    def tokens(x):  # (B, H, T, hd) -> (B * T, H, hd); free when x is a transposed (B, T, H, hd) projection
        return x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3])

    out = kernel(tokens(q), tokens(k), tokens(v), cu_seqlens, cu_seqlens, longest, longest, **options)
    return out.view(B, T, Hq, v.shape[3]).transpose(1, 2)
