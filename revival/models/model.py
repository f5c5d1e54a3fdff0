"""`LanguageModel`: embedding -> residual blocks from a layer pattern -> final norm -> LM head.

Stable attribute names (the HF xLSTM import/export maps onto them):

    model.embedding   nn.Embedding(vocab_size, d_model)
    model.blocks      nn.ModuleList of `ResidualBlock` (see blocks.py: .norm, .mixer, .ffn_norm, .ffn)
    model.out_norm    LayerNorm (final_norm="layer") or RMSNorm (final_norm="rms")
    model.lm_head     nn.Linear(d_model, vocab_size, bias=False); shares embedding.weight when tie_embeddings

forward(input_ids: (B, T) long, state=None) -> (logits: (B, T, vocab_size), state), where state is a list with one
entry per block (each the block mixer's state; None means zeros). Feeding the returned state back continues the
sequence exactly: prefill + single-token steps == one forward over the whole sequence.
forward(input_ids, document_starts=...) or (..., attention_mask=...): packed documents / padded rows, each document
exactly as if alone (docs/math.md).
forward(input_ids, labels=input_ids) -> (logits, state, loss): the mean next-token cross-entropy, Hugging Face style
(labels are shifted inside; -100 is ignored).
`model.set_activation_checkpointing(True)` recomputes each block's activations in backward instead of keeping them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..layers.norms import LayerNorm, RMSNorm
from ..ops._documents import check_document_starts, from_attention_mask
from ..ops.fused import soft_cap
from .blocks import build_block
from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig


class LanguageModel(nn.Module):
    """A causal language model built from a `ModelConfig`.

    torch.compile: `compiled = torch.compile(model)`, then call `compiled(input_ids, labels=...)` as the model (the
    weights are shared). Llama, minGRU/minLSTM, Mamba-2/3 and Gated DeltaNet blocks compile to one graph. The mLSTM
    and sLSTM ops run eagerly on purpose (hand-written autograd.Functions, `torch.compiler.disable` in
    revival/ops/{mlstm,slstm}/__init__.py), so each m/s/x block is split at that op (quiet graph breaks in the
    model, block and layer frames); a MoE feed-forward breaks at its per-expert split, and `attention_mask` /
    `document_starts` at their data-dependent checks. A new input shape compiles again: keep (B, T) fixed.
    tests/models/test_compile.py counts the breaks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(build_block(config, i) for i in range(config.num_blocks))
        if config.final_norm == "layer":
            self.out_norm = LayerNorm(config.d_model, eps=config.norm_eps, bias=config.use_bias)
        else:
            self.out_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations during backward instead of keeping them: activation memory of one block
        instead of all, for one more forward pass per step. Training only; results are unchanged."""
        self.activation_checkpointing = bool(enabled)

    # ------------------------------------------------------------------ parameters
    def _reset_own_parameters(self) -> None:
        std = math.sqrt(2.0 / (5.0 * self.config.d_model))  # "small init" of the xLSTM paper
        nn.init.normal_(self.embedding.weight, mean=0.0, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        self.out_norm.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialize every parameter (embedding/head small init, each block's own `reset_parameters`)."""
        for block in self.blocks:
            block.reset_parameters()
        self._reset_own_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once); optionally without the embedding/head."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embedding.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    @staticmethod
    def state_bytes(state) -> int:
        """Bytes held by a state returned by `forward` (constant in T for recurrent blocks; attention adds KV)."""
        return state_bytes(state)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, state: list | None = None,
                labels: torch.Tensor | None = None, *, document_starts: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """input_ids (B, T) integer -> (logits (B, T, V) in the model dtype, new state: list, one entry per block).

        With `labels` (B, T) (usually `input_ids` itself): (logits, state, loss), loss the mean float32 cross-entropy
        of logits[:, :-1] against labels[:, 1:], positions labelled -100 left out.

        Packed documents: `document_starts` (B, T) bool, True at the first token of each document; every layer
        restarts there, so a packed row gives exactly the logits of separate calls per document (the returned state
        is each row's last document's). `attention_mask` (B, T) of 0/1 (Hugging Face style) is turned into document
        starts wherever it changes (revival/ops/_documents.py), so a left-padded prompt sees none of its padding."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected an integer tensor of shape (B, T), got {got}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids: expected at least one token (T >= 1), got T = 0")
        if state is None:
            state = [None] * len(self.blocks)
        elif len(state) != len(self.blocks):
            raise ValueError(f"state: expected a list of {len(self.blocks)} per-block states, got {len(state)}")
        document_starts = _document_starts(input_ids, document_starts, attention_mask)
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected a tensor shaped like input_ids {tuple(input_ids.shape)}, got {got}")
        try:
            x = self.embedding_dropout(self.embedding(input_ids))
        except IndexError:  # nn.Embedding's own message names no sizes
            raise UserError(f"input_ids: token ids must lie in [0, {self.config.vocab_size}), got min "
                            f"{int(input_ids.min())}, max {int(input_ids.max())}") from None
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        new_state = []
        for block, block_state in zip(self.blocks, state):
            if recompute:
                x, block_state = checkpoint(block, x, block_state, document_starts, use_reentrant=False)
            else:
                x, block_state = block(x, block_state, document_starts)
            new_state.append(block_state)
        logits = soft_cap(self.lm_head(self.out_norm(x)), self.config.logit_soft_cap)
        if labels is None:
            return logits, new_state
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, new_state, loss

    # ------------------------------------------------------------------ generation (revival.generate)
    def generate(self, input_ids, max_new_tokens: int | None = None, **kwargs: Any) -> torch.Tensor:
        """Prompt + generated ids; see `revival.generate.generate` for the sampling (and Hugging Face-style)
        arguments."""
        from ..generate.sampling import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def stream(self, input_ids, max_new_tokens: int | None = None, **kwargs: Any) -> Iterator:
        """Yield new tokens as they are sampled; see `revival.generate.stream`."""
        from ..generate.sampling import stream

        return stream(self, input_ids, max_new_tokens, **kwargs)

    # ------------------------------------------------------------------ weights
    def save_pretrained(self, directory: str | Path, format: str = "revival", tokenizer=None) -> Path:
        """Write `config.json` + `model.safetensors` atomically (format "revival") or a HF xLSTM directory ("hf"),
        and the `tokenizer`'s files when given (then `revival generate directory` works)."""
        return save_pretrained(self, directory, format=format, tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, dtype=None) -> LanguageModel:
        """A model saved by `save_pretrained` (or a HF xLSTM directory) on `device`, in `dtype` if given (else the
        stored dtype)."""
        return load_pretrained(cls, directory, device=device, dtype=dtype)

    # ------------------------------------------------------------------ summaries
    def extra_repr(self) -> str:
        c = self.config
        return (f"pattern={c.pattern!r}, d_model={c.d_model}, vocab_size={c.vocab_size}, "
                f"parameters={format_count(self.num_parameters())}")

    def summary(self) -> str:
        """A short table: parameters per block kind, embedding/head, total."""
        c = self.config
        lines = [f"LanguageModel pattern={c.pattern!r} ({c.num_blocks} blocks) d_model={c.d_model} "
                 f"vocab_size={c.vocab_size} tie_embeddings={c.tie_embeddings}"]
        per_letter: dict[str, tuple[int, int]] = {}
        for block in self.blocks:
            count, params = per_letter.get(block.letter, (0, 0))
            per_letter[block.letter] = (count + 1, params + sum(p.numel() for p in block.parameters()))
        for letter, (count, params) in per_letter.items():
            lines.append(f"  {letter!r} x {count:<3d} {format_count(params):>10s}")
        embed = self.embedding.weight.numel() + (0 if c.tie_embeddings else self.lm_head.weight.numel())
        lines.append(f"  embedding+head {format_count(embed):>9s}")
        lines.append(f"  total          {format_count(self.num_parameters()):>9s} ({self.num_parameters():,})")
        return "\n".join(lines)


def from_pretrained(directory: str | Path, device=None, dtype=None) -> LanguageModel:
    """`LanguageModel.from_pretrained`: a saved revival model or a HF xLSTM directory."""
    return LanguageModel.from_pretrained(directory, device=device, dtype=dtype)


def _document_starts(input_ids: torch.Tensor, document_starts, attention_mask) -> torch.Tensor | None:
    """document_starts, or the ones of attention_mask, or both combined; None when there is no start at all (the
    layers' plain paths)."""
    B, T = input_ids.shape
    starts = check_document_starts(document_starts, B, T, input_ids.device)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask: expected a tensor shaped like input_ids {(B, T)}, got {got}")
        from_mask = from_attention_mask(attention_mask.to(input_ids.device))
        starts = from_mask if starts is None else starts | from_mask
    if starts is not None and not bool(starts.any()):
        return None
    return starts


def state_bytes(state) -> int:
    """Bytes held by a (nested list/tuple of) state tensor(s); None counts 0."""
    if state is None:
        return 0
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_bytes(s) for s in state.values())
    raise ValueError(f"state: expected tensors in nested lists/tuples/dicts, got {type(state).__name__}")


def format_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
