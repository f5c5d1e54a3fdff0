"""Named model layouts: `preset_config(name, **overrides) -> ModelConfig`.

    xlstm[a:b]    the paper's xLSTM: a mLSTM blocks per b sLSTM blocks (letters m, s), LayerNorm, no soft cap.
                  Within each group of a+b blocks the sLSTM blocks come right after the first mLSTM block, so
                  xlstm[3:1] with 4 blocks is "msmm" (the official `slstm_at=[1]`); pass `slstm_at=[...]` to place
                  them yourself. xlstm[1:0] is all mLSTM, xlstm[0:1] all sLSTM.
    xlstm-large   the xLSTM-7B layout (letter x) at any size: RMSNorm, SwiGLU, soft-capped gates and logits.
    xlstm-7b      the exact 7B configuration: d_model 4096, 32 blocks, 8 heads, vocab 50304, norm eps 1e-6.
    llama         the Transformer baseline (letter a): RoPE attention + SwiGLU, RMSNorm.

The siblings share the Llama block shape (RMSNorm pre-norms, SwiGLU feed-forward after every mixer):

    mingru          all minGRU blocks (letter g): "gggg..."
    minlstm         all minLSTM blocks (letter l): "llll..."
    mamba2          all Mamba-2 blocks (letter M): "MMMM..."
    gated-deltanet  all Gated DeltaNet blocks (letter d): "dddd..."
    hybrid          Qwen3-Next style 3:1 Gated DeltaNet : attention, the attention last in each group of 4: "ddda" * n
    jamba           Jamba style 1 attention per 7 Mamba-2: "MMMMaMMM" * n, the attention at offset 4 of each group of
                    8 (Jamba's attn_layer_offset=4, attn_layer_period=8); no MoE. Fewer than 5 blocks have no attention.

A depth that is not a multiple of the repeating unit truncates the last unit (hybrid with 6 blocks: "dddadd"). The
sibling mixers follow the model's fields through `layer_options` (entries given by the caller win, key by key):
g/l get chunk_size and bias; M gets chunk_size, bias, d_state 128 and head_dim = expand * d_model / num_heads (so
num_heads counts the SSD heads); d gets num_heads, chunk_size and bias (head_dim d_model / num_heads, expand_v 2).

Overrides are ModelConfig fields plus `num_blocks` (the depth; the pattern is rebuilt) and, for xlstm[a:b], `slstm_at`.
"""

from __future__ import annotations

import re
from typing import Any

from .config import ModelConfig

PRESET_NAMES = ("xlstm[a:b]", "xlstm-large", "xlstm-7b", "llama", "mingru", "minlstm", "mamba2", "gated-deltanet",
                "hybrid", "jamba")
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
_DEFAULT_BLOCKS = {"xlstm": 4, "xlstm-large": 6, "llama": 6}
# sibling preset -> (repeating pattern unit, default depth); built on the Llama base (RMSNorm, SwiGLU)
_SIBLING_PATTERNS: dict[str, tuple[str, int]] = {
    "mingru": ("g", 6), "minlstm": ("l", 6), "mamba2": ("M", 6), "gated-deltanet": ("d", 6),
    "hybrid": ("ddda", 8), "jamba": ("MMMMaMMM", 8),
}
MAMBA2_D_STATE = 128


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
    elif key == "llama":
        family = "llama"
    elif key in _SIBLING_PATTERNS:
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
        default_blocks = _SIBLING_PATTERNS[key][1] if key in _SIBLING_PATTERNS else _DEFAULT_BLOCKS[family]
        num_blocks = len(overrides["pattern"]) if "pattern" in overrides else default_blocks
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks: expected a positive integer, got {num_blocks!r}")
    if family == "xlstm":
        d["pattern"] = xlstm_pattern(int(ratio.group(1)), int(ratio.group(2)), num_blocks, slstm_at)
    elif key in _SIBLING_PATTERNS:
        unit = _SIBLING_PATTERNS[key][0]
        d["pattern"] = (unit * -(-num_blocks // len(unit)))[:num_blocks]
    else:
        d["pattern"] = ("x" if family == "xlstm-large" else "a") * num_blocks
    unknown = sorted(set(overrides) - set(ModelConfig.field_names()))
    if unknown:
        raise ValueError(f"overrides: unknown key(s) {unknown}; valid keys: "
                         f"{ModelConfig.field_names() + ['num_blocks', 'slstm_at']}")
    d.update(overrides)
    if key in _SIBLING_PATTERNS:
        d["layer_options"] = sibling_layer_options(ModelConfig.from_dict(d))
    return ModelConfig.from_dict(d)


def sibling_layer_options(config: ModelConfig) -> dict[str, dict[str, Any]]:
    """`config.layer_options` completed with the sibling mixers' sizes derived from the model fields.

    Only letters present in the pattern get entries; options already in `config.layer_options` are kept as given.
    """
    user = config.layer_options
    derived: dict[str, dict[str, Any]] = {}
    letters = set(config.pattern)
    for letter in letters & set("gl"):
        derived[letter] = dict(chunk_size=config.chunk_size, bias=config.use_bias)
    if "M" in letters:
        expand = user.get("M", {}).get("expand", 2)
        derived["M"] = dict(d_state=MAMBA2_D_STATE, head_dim=expand * config.d_model // config.num_heads,
                            chunk_size=config.chunk_size, bias=config.use_bias)
    if "d" in letters:
        derived["d"] = dict(num_heads=config.num_heads, chunk_size=config.chunk_size, bias=config.use_bias)
    merged = {letter: dict(options) for letter, options in user.items()}
    for letter, options in derived.items():
        merged[letter] = {**options, **user.get(letter, {})}
    return merged
