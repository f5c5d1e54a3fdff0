"""Generation: prefill + single-token steps with carried state; greedy, temperature, top-k/top-p, repetition penalty."""

from .sampling import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    process_logits,
    sample_next,
    stream,
)

__all__ = [
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "generate",
    "process_logits",
    "sample_next",
    "stream",
]
