"""Named model layouts: `preset_config(name, **overrides) -> ModelConfig`.

    xlstm[a:b]    the paper's xLSTM: a mLSTM blocks per b sLSTM blocks (letters m, s), LayerNorm, no soft cap.
                  Within each group of a+b blocks the sLSTM blocks come right after the first mLSTM block, so
                  xlstm[3:1] with 4 blocks is "msmm" (the official `slstm_at=[1]`); pass `slstm_at=[...]` to place
                  them yourself. xlstm[1:0] is all mLSTM, xlstm[0:1] all sLSTM.
    xlstm-large   the xLSTM-7B layout (letter x) at any size: RMSNorm, SwiGLU, soft-capped gates and logits.
    xlstm-7b      the exact 7B configuration: d_model 4096, 32 blocks, 8 heads, vocab 50304, norm eps 1e-6.
    hybrid        Qwen3-Next style 3:1 Gated DeltaNet : attention, the attention last in each group of 4: "ddda" * n
    qwen3-next    Qwen3-Next's layout: "ddda" * n with gated attention (output gate, partial RoPE on a quarter of each
                  head) and a MoE feed-forward in every block: 16 experts of width 0.5 d_model, top 4, plus a gated
                  shared expert of width 0.5 d_model (the published 512 experts / top 10 scaled down to small models)
    olmo-hybrid   OLMo Hybrid's 3:1 Gated DeltaNet : attention, "ddda" * n, dense SwiGLU feed-forwards, and its
                  allow_neg_eigval: the Gated DeltaNet's beta = 2 sigmoid(.) in (0, 2)
    jamba         Jamba style 1 attention per 7 Mamba-2: "MMMMaMMM" * n, the attention at offset 4 of each group of
                  8 (Jamba's attn_layer_offset=4, attn_layer_period=8), and Jamba's MoE (16 experts, top 2, no shared
                  expert) in every other block (expert_layer_period=2, offset=1). Fewer than 5 blocks have no attention.

and one preset per layer kind that declares `preset=` (revival/layers/kinds.py): that kind alone, 6 blocks, on the
Llama base (d_model 512, 8 heads, RMSNorm pre-norms, a SwiGLU after every mixer):

    llama           the Transformer baseline (letter a): "aaaa..."
    mingru          minGRU blocks (letter g): "gggg..."
    minlstm         minLSTM blocks (letter l): "llll..."
    mamba2          Mamba-2 blocks (letter M): "MMMM..."
    gated-deltanet  Gated DeltaNet blocks (letter d): "dddd..."
    mamba3          Mamba-3 blocks (letter 3): "3333..."

A depth that is not a multiple of the repeating unit truncates the last unit (hybrid with 6 blocks: "dddadd"). The
layers' sizes (Mamba-2 head_dim = expand * d_model / num_heads, Gated DeltaNet heads, chunk sizes, ...) are derived
from the config when the blocks are built, as for any `ModelConfig`. `layer_options` given here are merged into the
preset's per letter and option (`{"M": {"d_state": 32}}` keeps jamba's MoE; `{"M": {"moe": None}}` drops it).

Overrides are ModelConfig fields plus `num_blocks` (the depth; the pattern is rebuilt) and, for xlstm[a:b], `slstm_at`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from ..layers.kinds import layer_kinds
from .config import ModelConfig

_XLSTM_RATIO = re.compile(r"^xlstm\[(\d+):(\d+)\]$")

_BASE: dict[str, dict[str, Any]] = {
    "xlstm": dict(vocab_size=50304, d_model=256, num_heads=4, norm_eps=1e-5, final_norm="layer", use_bias=False,
                  tie_embeddings=False, logit_soft_cap=None, mlstm_proj_factor=2.0, mlstm_conv_kernel=4,
                  mlstm_qkv_block_size=4, slstm_conv_kernel=4, slstm_ffn_proj_factor=4 / 3,
                  slstm_ffn_activation="gelu"),
    "xlstm-large": dict(vocab_size=50304, d_model=512, num_heads=4, norm_eps=1e-6, final_norm="rms", use_bias=False,
                        tie_embeddings=False, logit_soft_cap=30.0, qk_dim_factor=0.5, v_dim_factor=1.0,
                        gate_soft_cap=15.0, ffn_proj_factor=2.667, ffn_round_up_to_multiple_of=64),
    "llama": dict(vocab_size=50304, d_model=512, num_heads=8, norm_eps=1e-6, final_norm="rms", use_bias=False,
                  tie_embeddings=False, logit_soft_cap=None, rope_theta=10000.0, ffn_proj_factor=8 / 3,
                  ffn_round_up_to_multiple_of=64),
}
_DEFAULT_BLOCKS = {"xlstm": 4, "xlstm-large": 6}
# preset on the Llama base -> (repeating pattern unit, default depth): one per layer kind that declares a preset,
# and the hybrids
_LLAMA_BASE_PATTERNS: dict[str, tuple[str, int]] = {
    **{kind.preset: (kind.letter, 6) for kind in layer_kinds().values() if kind.preset},
    "hybrid": ("ddda", 8), "qwen3-next": ("ddda", 8), "olmo-hybrid": ("ddda", 8), "jamba": ("MMMMaMMM", 8),
}
_QWEN3_NEXT_MOE = dict(num_experts=16, top_k=4, expert_proj_factor=0.5, shared_proj_factor=0.5, shared_gate=True)
# preset -> its layer_options (the caller's are merged in per letter)
_PRESET_LAYER_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3-next": {"d": {"moe": _QWEN3_NEXT_MOE},
                   "a": {"output_gate": True, "rope_fraction": 0.25, "moe": _QWEN3_NEXT_MOE}},
    "olmo-hybrid": {"d": {"allow_neg_eigval": True}},
    "jamba": {"M": {"moe": dict(num_experts=16, top_k=2, every=2, offset=1)}},
}
PRESET_NAMES = ("xlstm[a:b]", "xlstm-large", "xlstm-7b", *_LLAMA_BASE_PATTERNS)


def xlstm_pattern(num_mlstm: int, num_slstm: int, num_blocks: int, slstm_at: list[int] | None = None) -> str:
    """The m/s pattern of xLSTM[num_mlstm:num_slstm] with `num_blocks` blocks (see module docstring)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
    if slstm_at is not None:
        bad = [i for i in slstm_at if not isinstance(i, int) or not 0 <= i < num_blocks]
        if bad:
            raise ValueError(f"slstm_at: block indices must lie in [0, {num_blocks}), got {bad}")
        return "".join("s" if i in set(slstm_at) else "m" for i in range(num_blocks))
    if num_mlstm + num_slstm == 0:
        raise ValueError("xlstm[a:b]: a + b must be positive, got xlstm[0:0]")
    group = num_mlstm + num_slstm
    if num_mlstm == 0:
        return "s" * num_blocks
    # In each group: one mLSTM block, then the b sLSTM blocks, then the remaining a-1 mLSTM blocks.
    return "".join("s" if 1 <= i % group <= num_slstm else "m" for i in range(num_blocks))


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """A `ModelConfig` for a named layout (see module docstring), with any field overridden."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected a preset name among {list(PRESET_NAMES)}, got {name!r}")
    key = name.strip().lower()
    num_blocks = overrides.pop("num_blocks", None)
    slstm_at = overrides.pop("slstm_at", None)
    ratio = _XLSTM_RATIO.match(key)
    if ratio:
        family = "xlstm"
    elif key in ("xlstm-large", "xlstm-7b"):
        family = "xlstm-large"
    elif key in _LLAMA_BASE_PATTERNS:
        family = "llama"
    else:
        raise ValueError(f"name: unknown preset {name!r}; valid presets: {list(PRESET_NAMES)} "
                         f"(e.g. 'xlstm[7:1]', 'xlstm[1:0]')")
    if slstm_at is not None and family != "xlstm":
        raise ValueError(f"slstm_at: only for xlstm[a:b] presets, not {name!r}")
    d = dict(_BASE[family])
    if key == "xlstm-7b":
        d.update(d_model=4096, num_heads=8, vocab_size=50304, norm_eps=1e-6)
        num_blocks = 32 if num_blocks is None else num_blocks
    if num_blocks is None:
        default_blocks = _LLAMA_BASE_PATTERNS[key][1] if key in _LLAMA_BASE_PATTERNS else _DEFAULT_BLOCKS[family]
        num_blocks = len(overrides["pattern"]) if "pattern" in overrides else default_blocks
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
    if "pattern" in overrides and len(overrides["pattern"]) != num_blocks:
        raise ValueError(f"num_blocks: {num_blocks} disagrees with pattern={overrides['pattern']!r} "
                         f"({len(overrides['pattern'])} blocks); give one of them, or both in agreement")
    if family == "xlstm":
        d["pattern"] = xlstm_pattern(int(ratio.group(1)), int(ratio.group(2)), num_blocks, slstm_at)
    elif key in _LLAMA_BASE_PATTERNS:
        unit = _LLAMA_BASE_PATTERNS[key][0]
        d["pattern"] = (unit * -(-num_blocks // len(unit)))[:num_blocks]
    else:
        d["pattern"] = "x" * num_blocks
    unknown = sorted(set(overrides) - set(ModelConfig.field_names()))
    if unknown:
        raise ValueError(f"overrides: unknown key(s) {unknown}; valid keys: "
                         f"{ModelConfig.field_names() + ['num_blocks', 'slstm_at']}")
    layer_options = copy.deepcopy(_PRESET_LAYER_OPTIONS.get(key, {}))
    given = overrides.pop("layer_options", {})
    if not isinstance(given, dict):
        raise ValueError(f"layer_options: expected a dict letter -> options, got {given!r}")
    for letter, options in given.items():
        layer_options[letter] = {**layer_options.get(letter, {}), **options} if isinstance(options, dict) else options
    d.update(overrides, layer_options=layer_options)
    return ModelConfig.from_dict(d)
