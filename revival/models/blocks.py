"""Residual blocks and the registry that turns a pattern letter into one.

Every block is a `ResidualBlock` with stable attribute names (the HF import/export relies on them):

    block.norm      pre-norm of the mixer                (LayerNorm for m/s, RMSNorm otherwise)
    block.mixer     the sequence mixer                   (MLSTMLayer, SLSTMLayer, XLSTMLargeLayer, Attention, ...)
    block.ffn_norm  pre-norm of the feed-forward, or None
    block.ffn       the feed-forward (GatedMLP / SwiGLU / MoE), or None

forward(x: (B, T, D), state) -> (x: (B, T, D), state), where state is the mixer's state (None means zeros):

    x = x + mixer(norm(x), state)
    x = x + ffn(ffn_norm(x))          # when the block has a feed-forward

`build_block(config, index)` builds the block of `config.pattern[index]` from that letter's layer kind: its mixer
`kind.layer(d_model, **options)`, its pre-norm (`kind.norm`) and feed-forward (`kind.ffn`). The kinds are declared
beside their layers (revival/layers/kinds.py says how to add one); nothing here names a layer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from ..layers.ffn import GatedMLP, SwiGLU, ffn_hidden_dim
from ..layers.kinds import layer_kinds
from ..layers.moe import MoEOptions
from ..layers.norms import LayerNorm, RMSNorm
from .config import ModelConfig


class ResidualBlock(nn.Module):
    """x + mixer(norm(x)), then optionally x + ffn(ffn_norm(x)). Shapes (B, T, D) in and out."""

    def __init__(self, letter: str, norm: nn.Module, mixer: nn.Module, ffn_norm: nn.Module | None = None,
                 ffn: nn.Module | None = None, dropout: float = 0.0, block_index: int = 0, num_blocks: int = 1):
        super().__init__()
        if (ffn is None) != (ffn_norm is None):
            raise ValueError("ffn and ffn_norm: give both or neither")
        self.letter = letter
        self.block_index, self.num_blocks = block_index, num_blocks
        self.norm = norm
        self.mixer = mixer
        self.ffn_norm = ffn_norm
        self.ffn = ffn
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_parameters(self) -> None:
        """Each part's own init; mixers and FFNs that accept them get this block's position and the stack depth."""
        for module in (self.norm, self.mixer, self.ffn_norm, self.ffn):
            if module is None:
                continue
            accepted = inspect.signature(module.reset_parameters).parameters
            if "block_index" in accepted and "num_blocks" in accepted:
                module.reset_parameters(block_index=self.block_index, num_blocks=self.num_blocks)
            else:
                module.reset_parameters()

    def forward(self, x: torch.Tensor, state=None, document_starts: torch.Tensor | None = None):
        """document_starts (B, T) bool or None: the mixer restarts at each document (revival/ops/_documents.py)."""
        if document_starts is None:
            y, state = self.mixer(self.norm(x), state)
        else:
            y, state = self.mixer(self.norm(x), state, document_starts=document_starts)
        x = x + self.dropout(y)
        if self.ffn is not None:
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, state

    def extra_repr(self) -> str:
        return f"letter={self.letter!r}, block_index={self.block_index}"


def _swiglu(config: ModelConfig) -> nn.Module:
    hidden = ffn_hidden_dim(config.d_model, config.ffn_proj_factor, config.ffn_round_up_to_multiple_of)
    return SwiGLU(config.d_model, hidden, bias=config.use_bias)


def _gated_mlp(config: ModelConfig) -> nn.Module:
    return GatedMLP(config.d_model, proj_factor=config.slstm_ffn_proj_factor, activation=config.slstm_ffn_activation,
                    round_to=config.ffn_round_up_to_multiple_of, bias=config.use_bias)


def _rms(config: ModelConfig) -> nn.Module:
    return RMSNorm(config.d_model, eps=config.norm_eps)


def _layernorm(config: ModelConfig) -> nn.Module:
    return LayerNorm(config.d_model, eps=config.norm_eps, bias=config.use_bias)


# the block parts a layer kind names (`LayerKind.norm`, `LayerKind.ffn`)
NORM_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {"layer": _layernorm, "rms": _rms}
FFN_BUILDERS: dict[str, Callable[[ModelConfig], nn.Module]] = {"swiglu": _swiglu, "gated_mlp": _gated_mlp}


def build_block(config: ModelConfig, index: int) -> ResidualBlock:
    """The block for `config.pattern[index]`, as its layer kind declares it (revival/layers/kinds.py)."""
    letter = config.pattern[index]
    kinds = layer_kinds()
    if letter not in kinds:
        raise ValueError(f"pattern: no layer kind for letter {letter!r}; known: {sorted(kinds)}")
    kind = kinds[letter]
    mixer = kind.layer(config.d_model, **kind.build_options(config).kwargs())
    norm = NORM_BUILDERS[kind.norm]
    ffn_norm, ffn = (None, None) if kind.ffn is None else (norm(config), FFN_BUILDERS[kind.ffn](config))
    moe = config.layer_options.get(letter, {}).get("moe")  # a block option (revival/layers/kinds.py BLOCK_OPTIONS)
    moe = None if moe is None else MoEOptions.from_dict(letter, moe)
    if moe is not None and moe.applies_to(index):  # the block option `moe` replaces (or adds) the feed-forward
        ffn_norm, ffn = norm(config), moe.build(config)
    return ResidualBlock(letter, norm(config), mixer, ffn_norm, ffn, dropout=config.dropout, block_index=index,
                         num_blocks=config.num_blocks)
