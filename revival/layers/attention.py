"""Llama-style causal self-attention: q/k/v/o projections, RoPE, grouped-query heads, a KV cache as the state."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops._documents import check_document_starts, key_starts
from ..ops.attention import append_kv, apply_rope, causal_attention, rope_cos_sin
from .ffn import small_init_, wang_init_
from .kinds import LayerKind, LayerOptions
from .linear import linear_many

__all__ = ["Attention"]


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and GQA (the Transformer baseline's mixer; no residual, no pre-norm).

    forward(x: (B, T, D), state=None) -> (y: (B, T, D), state) with state = (k_cache, v_cache), each
    (B, num_kv_heads, T_so_far, head_dim), keys stored after RoPE. The position of x[:, 0] is T_so_far, so a prefill
    followed by single-token (or multi-token) steps reproduces one forward over the whole sequence.

    Qwen3-Next's gated attention: `output_gate=True` multiplies the heads' output by sigmoid(W_gate x) (one gate per
    channel) before o_proj; `rope_fraction` < 1 rotates only the first rope_fraction * head_dim dims of each head
    (partial RoPE, rounded down to an even count), the rest carry no position.
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int | None = None, rope_theta: float = 10000.0,
                 bias: bool = False, output_gate: bool = False, rope_fraction: float = 1.0):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of d_model={d_model}, got {num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: expected a positive divisor of num_heads={num_heads}, got {num_kv_heads}")
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        if self.head_dim % 2:
            raise ValueError(f"num_heads: head_dim = d_model / num_heads must be even for RoPE, got {self.head_dim}")
        self.rope_theta = rope_theta
        if not 0.0 < rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction: expected a number in (0, 1], got {rope_fraction!r}")
        self.rope_fraction, self.rope_dim = rope_fraction, 2 * int(rope_fraction * self.head_dim / 2)
        if self.rope_dim < 2:
            raise ValueError(f"rope_fraction: {rope_fraction} of head_dim {self.head_dim} rotates no pair of dims")
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, kv_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, kv_dim, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.gate_proj = nn.Linear(d_model, d_model, bias=bias) if output_gate else None
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init for q/k/v, Wang init (depth `num_blocks`) for o_proj, zero biases."""
        inputs = [m for m in (self.q_proj, self.k_proj, self.v_proj, self.gate_proj) if m is not None]
        for linear in inputs:
            small_init_(linear.weight, self.d_model)
        wang_init_(self.o_proj.weight, self.d_model, num_blocks)
        for linear in (*inputs, self.o_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, ...] | None = None,
        document_starts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """document_starts (B, T) bool or None: each query attends to its own document only, RoPE positions restart
        at 0 there, and the state becomes (k_cache, v_cache, cache_start (B,) long), where cache_start is where each
        row's last document began, so later calls keep to it (a left-padded prompt's decoding never sees the pad)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        document_starts = check_document_starts(document_starts, B, T, x.device)
        q, k, v = linear_many(x, [self.q_proj, self.k_proj, self.v_proj])
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(state, "attend"):  # a per-row-length cache written in place (revival/serve/slots.py SlotKVCache)
            if document_starts is not None:
                raise ValueError("document_starts: not supported with a slot KV cache (one document per slot)")
            if self.rope_dim != self.head_dim:
                raise ValueError(f"rope_fraction: {self.rope_fraction} is not supported with a slot KV cache")
            y = state.attend(q, k, v, self.rope_theta)
            return self._output(x, y.transpose(1, 2).reshape(B, T, self.d_model)), state
        start = 0 if state is None else state[0].shape[2]
        cache_start = state[2] if state is not None and len(state) == 3 else None
        positions = torch.arange(start, start + T, device=x.device)
        documents = document_starts is not None or cache_start is not None
        if documents:  # positions restart at each document: (B, T)
            first_key = key_starts(document_starts, T, start + T, cache_start)
            positions = positions - first_key
        rope_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(positions, self.rope_dim, self.rope_theta, rope_dtype)
        if documents:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd): per row, shared by the heads
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        k_all, v_all = append_kv(None if state is None else tuple(state[:2]), k, v)
        y = causal_attention(q, k_all, v_all, document_starts=document_starts, cache_start=cache_start)
        y = self._output(x, y.transpose(1, 2).reshape(B, T, self.d_model))
        return y, ((k_all, v_all, first_key[:, -1]) if documents else (k_all, v_all))

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_dim == self.head_dim:
            return apply_rope(t, cos, sin)
        return torch.cat([apply_rope(t[..., : self.rope_dim], cos, sin), t[..., self.rope_dim :]], dim=-1)

    def _output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """o_proj of the heads' output (B, T, D), gated by sigmoid(W_gate x) when output_gate."""
        if self.gate_proj is not None:
            y = y * torch.sigmoid(self.gate_proj(x))
        return self.o_proj(y)


@dataclass(frozen=True)
class AttentionOptions(LayerOptions):
    """Options of letter a (`layer_options["a"]`); None: the ModelConfig field in the comment."""

    num_heads: int | None = None  # num_heads
    num_kv_heads: int | None = None  # num_kv_heads (None there too: num_heads, no grouped-query sharing)
    rope_theta: float | None = None  # rope_theta
    bias: bool | None = None  # use_bias
    output_gate: bool = False  # Qwen3-Next gated attention: sigmoid(W_gate x) on the heads' output
    rope_fraction: float = 1.0  # partial RoPE: the fraction of each head's dims that rotate (Qwen3-Next: 0.25)

    def derive(self, config):
        return dict(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, rope_theta=config.rope_theta,
                    bias=config.use_bias)


LAYER_KINDS = (LayerKind(letter="a", name="Llama attention block", layer=Attention, options=AttentionOptions,
                         norm="rms", ffn="swiglu", preset="llama", bench_heads={"125m": 12, "1.3b": 16}),)
