"""The diagonal linear recurrence h_t = a_t * h_{t-1} + b_t, elementwise over channels, with signed b and h0.

Two forms with one signature, `(log_a (B, T, D), b (B, T, D), h0 (B, D) | None) -> (h (B, T, D), h_last (B, D))`:

- `linear_recurrence_reference` (`reference.py`): a plain loop over time (the float64 reference in the tests).
- `linear_recurrence_chunked` (here): split time into chunks of `chunk_size`; run the recurrence from zero inside
  all chunks at once (a loop of `chunk_size` steps, vectorized over chunks); solve the recurrence over the chunk
  boundaries, which is the same problem one level up (coefficient = product of a in the chunk, value = the chunk's
  local end state), by a recursive call; add `exp(cumulative log a) * chunk start state`. Sequential depth
  ~ chunk_size * log_L(T) instead of T; memory O(B T D); only products of a inside one chunk appear, so no division
  and no overflow when a <= 1. A length that is not a multiple of the chunk size is handled exactly: full chunks
  first, then the tail as one shorter chunk starting from their state (no padding).

The coefficient is given in log space (`a_t = exp(log_a_t)`), as the minGRU/minLSTM gates produce it. Computation
runs in float32 for half/bfloat16 inputs (float64 stays float64); `h` follows the input dtype, `h_last` is float32
(float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from .._checks import validate_recurrence
from .._common import compute_dtype


def linear_recurrence_chunked(
    log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, chunk_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_a_t) * h_{t-1} + b_t, chunkwise (see the module doc). Returns (h (B, T, D), h_last (B, D))."""
    validate_recurrence(log_a, b, h0)
    if chunk_size < 2:
        raise ValueError(f"chunk_size: expected an int >= 2, got {chunk_size}")
    dtype = compute_dtype(b)
    h_init = b.new_zeros(b.shape[0], b.shape[2], dtype=dtype) if h0 is None else h0.to(dtype)
    h, h_last = _chunked(log_a.to(dtype), b.to(dtype), h_init, chunk_size)
    return h.to(b.dtype), h_last


def _chunked(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = b.shape[1]
    if T <= L:
        return _one_chunk_loop(log_a, b, h0)
    full = (T // L) * L
    h_full, h_last = _equal_chunks(log_a[:, :full], b[:, :full], h0, L)
    if full == T:
        return h_full, h_last
    h_tail, h_last = _one_chunk_loop(log_a[:, full:], b[:, full:], h_last)
    return torch.cat([h_full, h_tail], dim=1), h_last


def _one_chunk_loop(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loop over a short stretch (T <= chunk size)."""
    a = torch.exp(log_a)
    h, outputs = h0, []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        outputs.append(h)
    return torch.stack(outputs, dim=1), h


def _equal_chunks(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked form for T a multiple of L (T > L)."""
    B, T, D = b.shape
    NC = T // L
    log_a = log_a.reshape(B, NC, L, D)
    b = b.reshape(B, NC, L, D)
    a = torch.exp(log_a)

    # 1. Inside every chunk, from a zero state (all chunks at once).
    local, outputs = torch.zeros_like(b[:, :, 0]), []
    for t in range(L):
        local = a[:, :, t] * local + b[:, :, t]
        outputs.append(local)
    local_h = torch.stack(outputs, dim=2)  # (B, NC, L, D)
    cumulative_log_a = torch.cumsum(log_a, dim=2)  # (B, NC, L, D)

    # 2. Over chunk boundaries: the same recurrence one level up (coefficient = whole-chunk product).
    chunk_ends, _ = _chunked(cumulative_log_a[:, :, -1], local_h[:, :, -1], h0, L)  # (B, NC, D)
    chunk_starts = torch.cat([h0[:, None], chunk_ends[:, :-1]], dim=1)  # (B, NC, D)

    # 3. Each position = its local value + the decayed chunk start state.
    h = (local_h + torch.exp(cumulative_log_a) * chunk_starts[:, :, None]).reshape(B, T, D)
    return h, h[:, -1]
