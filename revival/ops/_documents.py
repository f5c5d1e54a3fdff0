"""Document boundaries inside packed rows: `document_starts`, the one representation every op, layer and model takes.

`document_starts` is a (B, T) bool tensor, True at the first token of each document. At such a token the op's state
is discarded: the token sees exactly what the first token of a separate call with `state=None` sees (zero state,
zero stabilizer, empty conv window, no earlier keys, RoPE position 0). Without a start at t = 0 the row's first
document continues from the `state` passed in. A left-padded row is a row whose first document is the padding
(`from_attention_mask`). The returned final state is that of each row's last document. See docs/math.md.
"""

from __future__ import annotations

import torch


def check_document_starts(document_starts: torch.Tensor | None, batch: int, length: int,
                          device: torch.device) -> torch.Tensor | None:
    """Validate and return `document_starts` as a (batch, length) bool tensor on `device` (None stays None)."""
    if document_starts is None:
        return None
    if not isinstance(document_starts, torch.Tensor) or document_starts.dtype != torch.bool:
        got = document_starts.dtype if isinstance(document_starts, torch.Tensor) else type(document_starts).__name__
        raise ValueError(f"document_starts: expected a bool tensor of shape ({batch}, {length}), got {got}")
    if tuple(document_starts.shape) != (batch, length):
        raise ValueError(f"document_starts: expected shape ({batch}, {length}), got {tuple(document_starts.shape)}")
    return document_starts.to(device)


def from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 (or bool) attention mask -> document_starts: a start wherever the mask changes value.

    Left padding [0, 0, 1, 1] starts the prompt at t = 2 (the padding is the row's first document, and the prompt
    sees none of it); right padding [1, 1, 0] makes the tail its own document, which no real token sees anyway."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or attention_mask.is_floating_point():
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask: expected a (B, T) integer or bool tensor of 0/1, got {got}")
    mask = attention_mask.bool()
    if not torch.equal(mask.to(attention_mask.dtype), attention_mask):
        raise ValueError("attention_mask: expected only 0 and 1 entries")
    starts = torch.zeros_like(mask)
    starts[:, 1:] = mask[:, 1:] != mask[:, :-1]
    return starts


def from_lengths(lengths: list[list[int]], device: torch.device | None = None) -> torch.Tensor:
    """document_starts for rows given as lists of document lengths (every row the same total length)."""
    totals = {sum(row) for row in lengths}
    if len(totals) != 1 or any(n < 1 for row in lengths for n in row):
        raise ValueError(f"lengths: expected rows of positive lengths with one common total, got {lengths}")
    starts = torch.zeros(len(lengths), totals.pop(), dtype=torch.bool, device=device)
    for row, row_lengths in enumerate(lengths):
        position = 0
        for n in row_lengths:
            starts[row, position] = True
            position += n
    return starts


def document_ids(document_starts: torch.Tensor) -> torch.Tensor:
    """(B, T) long: the index of each token's document within its row (0 for a first document without a start)."""
    return torch.cumsum(document_starts.long(), dim=-1)


def key_starts(document_starts: torch.Tensor | None, num_queries: int, num_keys: int,
               cache_start: torch.Tensor | None = None) -> torch.Tensor:
    """(B, Tq) long: the first key position each query may attend to, the start of its document. The queries are the
    last Tq of the Tk key positions; a query before its row's first start (in `document_starts` (B, Tq)) belongs to
    the document running in the cache, which began at `cache_start` (B,) long (None: 0). RoPE positions are the
    queries' key positions minus this."""
    if document_starts is None and cache_start is None:
        raise ValueError("document_starts, cache_start: expected at least one of them")
    like = document_starts if document_starts is not None else cache_start
    before = torch.zeros(like.shape[0], 1, dtype=torch.long, device=like.device)
    if cache_start is not None:
        before = cache_start.reshape(-1, 1).long()
    if document_starts is None:
        return before.expand(-1, num_queries)
    steps = torch.arange(num_queries, device=document_starts.device)
    last_start = torch.cummax(torch.where(document_starts, steps, -1), dim=-1).values  # -1 before any start
    return torch.where(last_start >= 0, num_keys - num_queries + last_start, before)


def chunk_masks(document_starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks for chunkwise ops, from document_starts chunked as (..., L) (any leading dims, e.g. (B, NC, L)).

    Returns (same (..., L, L): query j and key s in one document; from_state (..., L): the token still belongs to the
    document that was running before the chunk; to_end (..., L): the token belongs to the chunk's last document;
    keeps_state (...): the chunk has no start, so the state before it reaches its end)."""
    local_ids = torch.cumsum(document_starts.long(), dim=-1)
    same = local_ids[..., :, None] == local_ids[..., None, :]
    from_state = local_ids == 0
    to_end = local_ids == local_ids[..., -1:]
    return same, from_state, to_end, local_ids[..., -1] == 0


def drop_state_at_first_start(state, document_starts: torch.Tensor | None):
    """Zero the rows of a (nested tuple of) recurrent state whose document starts at t = 0 (for layers whose
    single-token path calls a step function without document starts). None stays None."""
    if state is None or document_starts is None:
        return state
    starts = document_starts[:, 0]
    if isinstance(state, (tuple, list)):
        return type(state)(drop_state_at_first_start(part, document_starts) for part in state)
    return torch.where(starts.reshape(-1, *([1] * (state.ndim - 1))), 0.0, state)
