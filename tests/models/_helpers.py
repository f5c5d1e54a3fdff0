"""What the model-level tests share: the tiny vocabulary, randomised parameters, prefill + single-token steps, the
recurrent state after a short and a long context."""

from __future__ import annotations

import torch

VOCAB = 37


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter (gate biases, norms, zero-initialised recurrent weights) so no path hides behind an
    init; returns the model in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def prefill_then_steps(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """The logits of `ids` (B, T) from one forward of the first `prefill` tokens, then one token at a time with the
    state carried (no gradients)."""
    with torch.no_grad():
        logits, state = model(ids[:, :prefill])
        pieces = [logits]
        for t in range(prefill, ids.shape[1]):
            logits, state = model(ids[:, t:t + 1], state)
            pieces.append(logits)
    return torch.cat(pieces, 1)


def short_and_long_states(model, long: int, seed: int) -> tuple:
    """The state after 16 random tokens and after `long` random tokens (batch 1, no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        _, short_state = model(torch.randint(0, VOCAB, (1, 16), generator=gen))
        _, long_state = model(torch.randint(0, VOCAB, (1, long), generator=gen))
    return short_state, long_state
