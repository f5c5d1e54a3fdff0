"""Residual blocks and the registry that turns a pattern letter into one.

Every block is a `ResidualBlock` with stable attribute names (the HF import/export relies on them):

    block.norm      pre-norm of the mixer                (LayerNorm for m/s, RMSNorm otherwise)
    block.mixer     the sequence mixer                   (MLSTMLayer, SLSTMLayer, XLSTMLargeLayer, Attention, ...)
    block.ffn_norm  pre-norm of the feed-forward, or None
    block.ffn       the feed-forward (GatedMLP / SwiGLU), or None

forward(x: (B, T, D), state) -> (x: (B, T, D), state), where state is the mixer's state (None means zeros):

    x = x + mixer(norm(x), state)
    x = x + ffn(ffn_norm(x))          # when the block has a feed-forward

`BLOCK_BUILDERS` maps a letter to `builder(config, block_index) -> ResidualBlock`. Layers are imported lazily inside
the builders, so a model whose pattern does not use a layer never imports it. To wire a new letter, add one entry.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import import_module

import torch
from torch import nn

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

    def forward(self, x: torch.Tensor, state=None):
        y, state = self.mixer(self.norm(x), state)
        x = x + self.dropout(y)
        if self.ffn is not None:
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x, state

    def extra_repr(self) -> str:
        return f"letter={self.letter!r}, block_index={self.block_index}"


def _layer(module: str, name: str):
    """Import `revival.layers.<module>.<name>` on first use, with a clear error when it is not there."""
    try:
        return getattr(import_module(f"revival.layers.{module}"), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"layer {name} (revival/layers/{module}.py) is not available: {err}") from err


def _swiglu(config: ModelConfig) -> nn.Module:
    ffn_module = import_module("revival.layers.ffn")
    hidden = ffn_module.ffn_hidden_dim(config.d_model, config.ffn_proj_factor, config.ffn_round_up_to_multiple_of)
    return ffn_module.SwiGLU(config.d_model, hidden, bias=config.use_bias)


def _where(config: ModelConfig, index: int) -> dict:
    return dict(dropout=config.dropout, block_index=index, num_blocks=config.num_blocks)


def _rms(config: ModelConfig) -> RMSNorm:
    return RMSNorm(config.d_model, eps=config.norm_eps)


def _layernorm(config: ModelConfig) -> LayerNorm:
    return LayerNorm(config.d_model, eps=config.norm_eps, bias=config.use_bias)


def build_mlstm_block(config: ModelConfig, index: int) -> ResidualBlock:
    mixer = _layer("mlstm_layer", "MLSTMLayer")(
        config.d_model, num_heads=config.num_heads, proj_factor=config.mlstm_proj_factor,
        conv_kernel=config.mlstm_conv_kernel, qkv_block_size=config.mlstm_qkv_block_size,
        chunk_size=config.chunk_size, impl=config.mlstm_impl, bias=config.use_bias,
        **config.layer_options.get("m", {}))
    return ResidualBlock("m", _layernorm(config), mixer, **_where(config, index))


def build_slstm_block(config: ModelConfig, index: int) -> ResidualBlock:
    heads = config.slstm_num_heads if config.slstm_num_heads is not None else config.num_heads
    mixer = _layer("slstm_layer", "SLSTMLayer")(
        config.d_model, num_heads=heads, conv_kernel=config.slstm_conv_kernel, impl=config.slstm_impl,
        **config.layer_options.get("s", {}))
    ffn = _layer("ffn", "GatedMLP")(
        config.d_model, proj_factor=config.slstm_ffn_proj_factor, activation=config.slstm_ffn_activation,
        round_to=config.ffn_round_up_to_multiple_of, bias=config.use_bias)
    return ResidualBlock("s", _layernorm(config), mixer, _layernorm(config), ffn, **_where(config, index))


def build_xlstm_large_block(config: ModelConfig, index: int) -> ResidualBlock:
    mixer = _layer("xlstm_large", "XLSTMLargeLayer")(
        config.d_model, num_heads=config.num_heads, qk_dim_factor=config.qk_dim_factor,
        v_dim_factor=config.v_dim_factor, gate_soft_cap=config.gate_soft_cap, norm_eps=config.norm_eps,
        use_bias=config.use_bias, chunk_size=config.chunk_size, impl=config.mlstm_impl,
        **config.layer_options.get("x", {}))
    return ResidualBlock("x", _rms(config), mixer, _rms(config), _swiglu(config), **_where(config, index))


def build_attention_block(config: ModelConfig, index: int) -> ResidualBlock:
    mixer = _layer("attention", "Attention")(
        config.d_model, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads, rope_theta=config.rope_theta,
        bias=config.use_bias, **config.layer_options.get("a", {}))
    return ResidualBlock("a", _rms(config), mixer, _rms(config), _swiglu(config), **_where(config, index))


def _sibling_builder(letter: str, module: str, name: str) -> Callable[[ModelConfig, int], ResidualBlock]:
    """x + Mixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x)) with Mixer(d_model, **layer_options[letter])."""

    def build(config: ModelConfig, index: int) -> ResidualBlock:
        mixer = _layer(module, name)(config.d_model, **config.layer_options.get(letter, {}))
        return ResidualBlock(letter, _rms(config), mixer, _rms(config), _swiglu(config), **_where(config, index))

    build.__name__ = f"build_{module}_block"
    return build


BLOCK_BUILDERS: dict[str, Callable[[ModelConfig, int], ResidualBlock]] = {
    "m": build_mlstm_block,
    "s": build_slstm_block,
    "x": build_xlstm_large_block,
    "a": build_attention_block,
    "g": _sibling_builder("g", "mingru", "MinGRU"),
    "l": _sibling_builder("l", "minlstm", "MinLSTM"),
    "M": _sibling_builder("M", "mamba2", "Mamba2"),
    "d": _sibling_builder("d", "gated_deltanet", "GatedDeltaNet"),
}


def build_block(config: ModelConfig, index: int) -> ResidualBlock:
    """The block for `config.pattern[index]`."""
    letter = config.pattern[index]
    if letter not in BLOCK_BUILDERS:
        raise ValueError(f"pattern: no block builder for letter {letter!r}; known: {sorted(BLOCK_BUILDERS)}")
    return BLOCK_BUILDERS[letter](config, index)
