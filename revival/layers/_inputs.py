"""The checks at the top of a recurrent mixer's forward: the sequence x, its document starts and the state pair."""

from __future__ import annotations

import torch

from ..ops._documents import check_document_starts, drop_state_at_first_start


def check_mixer_input(x: torch.Tensor, d_model: int, document_starts: torch.Tensor | None) -> torch.Tensor | None:
    """x must be (B, T >= 1, d_model); returns `document_starts` checked as a (B, T) bool tensor on x's device."""
    if x.ndim != 3 or x.shape[-1] != d_model or x.shape[1] == 0:
        raise ValueError(f"x: expected shape (B, T >= 1, {d_model}), got {tuple(x.shape)}")
    return check_document_starts(document_starts, x.shape[0], x.shape[1], x.device)


def unpack_state(state, names: tuple[str, str], document_starts: torch.Tensor | None = None) -> tuple:
    """state None -> (None, None); a 2-tuple -> its parts; anything else -> ValueError naming the expected parts.
    With `document_starts` (checked), the rows whose document starts at t = 0 have their state zeroed (for layers
    whose single-token path runs a step function without document starts)."""
    if state is None:
        return None, None
    if not isinstance(state, (tuple, list)) or len(state) != 2:
        raise ValueError(f"state: expected a tuple ({names[0]}, {names[1]}) or None, got {type(state).__name__}")
    return drop_state_at_first_start((state[0], state[1]), document_starts)
