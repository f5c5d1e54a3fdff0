"""Causal attention helpers: rotary position embedding (RoPE), a KV cache, SDPA with an offset causal mask, and packed
rows (document_starts) through a per-document flash kernel on CUDA (`varlen.py`).

Pure functions over tensors. Layout: q (B, Hq, Tq, hd); k, v (B, Hkv, Tk, hd) with Hq a multiple of Hkv (grouped-query
attention); a KV cache is the pair (k_cache, v_cache), each (B, Hkv, T_so_far, hd), holding keys after RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_floating, check_shape
from .._documents import check_document_starts, key_starts

__all__ = ["rope_cos_sin", "apply_rope", "append_kv", "causal_mask", "causal_attention", "IMPLS"]

IMPLS = ("auto", "sdpa", "varlen")

KVCache = tuple[torch.Tensor, torch.Tensor]


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (..., T, head_dim) for integer `positions` (..., T), in the half-split ("rotate_half")
    convention (positions (B, T) give per-row tables, e.g. positions that restart at each document).

    Frequencies are computed in float64 and rounded once to `dtype`, so positions far from 0 stay accurate.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even number for RoPE, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., T, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, hd) by the tables cos, sin (T, hd): x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def append_kv(cache: KVCache | None, k: torch.Tensor, v: torch.Tensor) -> KVCache:
    """Return the cache extended by the new keys/values k, v (B, Hkv, T_new, hd) along time (dim 2)."""
    if cache is None:
        return k, v
    if not isinstance(cache, (tuple, list)) or len(cache) != 2:
        raise ValueError(f"cache: expected a tuple (k_cache, v_cache) or None, got {type(cache).__name__}")
    k_cache, v_cache = cache
    check_shape("cache[0] (k_cache)", k_cache, (k.shape[0], k.shape[1], None, k.shape[3]))
    check_shape("cache[1] (v_cache)", v_cache, (v.shape[0], v.shape[1], k_cache.shape[2], v.shape[3]))
    return torch.cat([k_cache.to(k.dtype), k], dim=2), torch.cat([v_cache.to(v.dtype), v], dim=2)


def causal_mask(num_queries: int, num_keys: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask (Tq, Tk), True = attend: the queries are the last Tq of the Tk positions (offset Tk - Tq)."""
    if num_keys < num_queries:
        raise ValueError(f"num_keys: expected >= num_queries ({num_queries}), got {num_keys}")
    return torch.ones(num_queries, num_keys, dtype=torch.bool, device=device).tril(diagonal=num_keys - num_queries)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     document_starts: torch.Tensor | None = None,
                     cache_start: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """Causal softmax attention where the Tq queries are the last Tq of the Tk key positions.

    q: (B, Hq, Tq, hd); k, v: (B, Hkv, Tk, hd), Tk >= Tq, Hq % Hkv == 0. Returns (B, Hq, Tq, hd), scale hd**-0.5.
    Uses `F.scaled_dot_product_attention`: `is_causal` when Tq == Tk, no mask for a single query, an explicit offset
    mask for a continuation chunk. With `document_starts` (B, Tq) bool and/or `cache_start` (B,) long (where the
    document running in the first Tk - Tq keys began), a query attends only to the keys of its own document: a
    block-diagonal causal mask (`key_starts`, revival/ops/_documents.py).
    `impl` for packed rows (document_starts, no cache, Tq == Tk): "sdpa" (the explicit mask; the reference),
    "varlen" (flash attention per document, `varlen.py`: CUDA, float16/bfloat16) or "auto" ("varlen" where it
    applies, else "sdpa"). Other calls always take the SDPA forms above.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    check_floating("q", q)
    if q.ndim != 4:
        raise ValueError(f"q: expected shape (B, Hq, Tq, hd), got {tuple(q.shape)}")
    B, Hq, Tq, hd = q.shape
    check_shape("k", k, (B, None, None, hd))
    check_shape("v", v, (B, k.shape[1], k.shape[2], None))
    Hkv, Tk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"k: expected a number of heads dividing q's {Hq}, got {Hkv}")
    if Tk < Tq:
        raise ValueError(f"k: expected at least Tq={Tq} positions, got {Tk}")
    document_starts = check_document_starts(document_starts, B, Tq, q.device)
    if impl != "sdpa" and document_starts is not None and cache_start is None and Tq == Tk:
        from .varlen import document_attention_varlen, varlen_supported

        unsupported = varlen_supported(q, v)
        if unsupported is None:
            return document_attention_varlen(q, k, v, document_starts)
        if impl == "varlen":
            raise ValueError(f"impl: 'varlen' {unsupported}; use 'auto' or 'sdpa'")
    elif impl == "varlen":
        raise ValueError("impl: 'varlen' is for packed rows (document_starts, no cache_start, Tq == Tk); "
                         "use 'auto' or 'sdpa'")
    if Hkv != Hq:  # grouped-query attention: each kv head serves Hq // Hkv query heads
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    if document_starts is not None or cache_start is not None:
        first_key = key_starts(document_starts, Tq, Tk, cache_start)  # (B, Tq)
        in_document = torch.arange(Tk, device=q.device) >= first_key[..., None]  # (B, Tq, Tk)
        mask = in_document & causal_mask(Tq, Tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(Tq, Tk, q.device))
