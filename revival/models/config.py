"""`ModelConfig`: one dataclass describing every model revival builds.

A model is an embedding, a stack of residual blocks described by a *layer pattern* (one letter per block), a final
norm and an LM head. Each letter is a layer kind declared beside its layer (revival/layers/kinds.py); `PATTERN_LETTERS`
maps each letter to its block, e.g.

    m   paper mLSTM block: x + MLSTMLayer(LayerNorm(x))
    s   paper sLSTM block: x + SLSTMLayer(LayerNorm(x)); x + GatedMLP(LayerNorm(x))
    M   Mamba-2 block:     x + Mamba2(RMSNorm(x)); x + SwiGLU(RMSNorm(x))

and `describe_layer_kinds()` lists every letter with its options. So xLSTM[7:1] is `"msmmmmmm..."`, a Transformer
is `"aaaa"` and a Jamba-style hybrid is `"MMMMaMMM"`: one field apart.

A block's layer takes the options in `layer_options[letter]` (e.g. `{"g": {"expansion": 2}}`; the names are the
fields of the kind's options dataclass); every option left out that follows the model (head counts, chunk_size,
bias, ...) is derived from this config's fields when the block is built, so `replace(num_heads=...)` re-derives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import reject_unknown
from ..layers.kinds import layer_kinds
from ..ops.mlstm import PRECISIONS as MLSTM_PRECISIONS

PATTERN_LETTERS: dict[str, str] = {k.letter: f"{k.name}: {k.equation}" for k in layer_kinds().values()}
MLSTM_IMPLS = ("auto", "recurrent", "parallel", "chunkwise", "triton")
# The meaning of a saved config.json; version 1 (no "config_version" key) is read by `ModelConfig.from_saved`.
# 2: layer options left out are derived from the model when a block is built (head counts, chunk_size, bias);
#    sLSTM blocks with conv_kernel=0 feed x to the i/f gates, as the official xlstm package does.
CONFIG_VERSION = 2
# What a version-1 config left out meant for these letters: the layers' own constructor defaults of the time.
_V1_OPTIONS: dict[str, dict[str, Any]] = {
    "g": dict(chunk_size=64, bias=False),
    "l": dict(chunk_size=64, bias=False),
    "M": dict(d_state=64, head_dim=64, chunk_size=64, bias=False),
    "d": dict(num_heads=4, chunk_size=64, bias=False),
}
FINAL_NORMS = ("layer", "rms")
FFN_ACTIVATIONS = ("gelu", "silu", "relu")


@dataclass
class ModelConfig:
    """Everything needed to build a `LanguageModel`. Sizes are per model; per-letter options apply where used."""

    vocab_size: int = 50304
    d_model: int = 256
    pattern: str = "m"
    num_heads: int = 4
    # paper mLSTM block (letter m)
    mlstm_proj_factor: float = 2.0
    mlstm_conv_kernel: int = 4
    mlstm_qkv_block_size: int = 4
    mlstm_impl: str = "auto"
    mlstm_precision: str = "auto"  # the mLSTM Triton kernels' precision for 16-bit inputs (letters m and x)
    chunk_size: int = 64  # chunk length of the chunkwise mLSTM (letters m and x)
    # paper sLSTM block (letter s)
    slstm_num_heads: int | None = None  # None: num_heads
    slstm_conv_kernel: int = 4  # 0: no conv
    slstm_impl: str = "auto"
    slstm_ffn_proj_factor: float = 4 / 3
    slstm_ffn_activation: str = "gelu"
    # xLSTM-7B mLSTM layer (letter x)
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    gate_soft_cap: float = 15.0
    # SwiGLU feed-forward (letters x, a and the sibling mixers); also rounds the sLSTM gated MLP
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    # attention (letter a)
    num_kv_heads: int | None = None  # None: num_heads (no grouped-query sharing)
    rope_theta: float = 10000.0
    # whole model
    norm_eps: float = 1e-6
    final_norm: str = "rms"  # "layer" (paper xLSTM) or "rms" (xLSTM-7B, Llama)
    tie_embeddings: bool = False
    logit_soft_cap: float | None = None  # logits -> cap * tanh(logits / cap)
    use_bias: bool = False
    dropout: float = 0.0
    layer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # letter -> its layer's options

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_blocks(self) -> int:
        return len(self.pattern)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the field, the value received and what is allowed."""
        for name in ("vocab_size", "d_model", "num_heads", "mlstm_conv_kernel", "mlstm_qkv_block_size", "chunk_size",
                     "ffn_round_up_to_multiple_of"):
            _check_positive_int(name, getattr(self, name))
        for name in ("mlstm_proj_factor", "slstm_ffn_proj_factor", "qk_dim_factor", "v_dim_factor", "gate_soft_cap",
                     "ffn_proj_factor", "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if isinstance(self.slstm_conv_kernel, bool) or not isinstance(self.slstm_conv_kernel, int) or \
                self.slstm_conv_kernel < 0:
            raise ValueError(f"slstm_conv_kernel: expected an integer >= 0 (0 = no conv), "
                             f"got {self.slstm_conv_kernel!r}")
        if self.chunk_size < 8 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two >= 8, got {self.chunk_size!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"pattern: expected a non-empty string of block letters, got {self.pattern!r}; "
                             f"letters: {_letters_help()}")
        kinds = layer_kinds()
        unknown = sorted({c for c in self.pattern if c not in kinds})
        if unknown:
            raise ValueError(f"pattern: unknown letter(s) {unknown} in {self.pattern!r}; "
                             f"valid letters: {_letters_help()}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide d_model={self.d_model}; "
                             f"choose one of {_divisors(self.d_model)}")
        letters = set(self.pattern)
        if "s" in letters:
            heads = self.slstm_num_heads if self.slstm_num_heads is not None else self.num_heads
            _check_positive_int("slstm_num_heads", heads)
            if self.d_model % heads:
                raise ValueError(f"slstm_num_heads: {heads} does not divide d_model={self.d_model}; "
                                 f"choose one of {_divisors(self.d_model)}")
        if "x" in letters:
            for name in ("qk_dim_factor", "v_dim_factor"):
                dim = getattr(self, name) * self.d_model
                if dim != int(dim) or int(dim) % self.num_heads:
                    raise ValueError(f"{name}: {getattr(self, name)} * d_model = {dim} must be an integer divisible "
                                     f"by num_heads={self.num_heads}")
        if self.num_kv_heads is not None:
            _check_positive_int("num_kv_heads", self.num_kv_heads)
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads={self.num_heads}; "
                                 f"choose one of {_divisors(self.num_heads)}")
        if self.mlstm_impl not in MLSTM_IMPLS:
            raise ValueError(f"mlstm_impl: expected one of {list(MLSTM_IMPLS)}, got {self.mlstm_impl!r}")
        if self.mlstm_precision not in MLSTM_PRECISIONS:
            raise ValueError(f"mlstm_precision: expected one of {list(MLSTM_PRECISIONS)}, got {self.mlstm_precision!r}")
        if not isinstance(self.slstm_impl, str) or not self.slstm_impl:
            raise ValueError(f"slstm_impl: expected an implementation name such as 'auto', got {self.slstm_impl!r}")
        if self.slstm_ffn_activation not in FFN_ACTIVATIONS:
            raise ValueError(f"slstm_ffn_activation: expected one of {list(FFN_ACTIVATIONS)}, "
                             f"got {self.slstm_ffn_activation!r}")
        if self.final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm: expected one of {list(FINAL_NORMS)}, got {self.final_norm!r}")
        if self.logit_soft_cap is not None and (isinstance(self.logit_soft_cap, bool) or
                                                not isinstance(self.logit_soft_cap, (int, float)) or
                                                not self.logit_soft_cap > 0):
            raise ValueError(f"logit_soft_cap: expected None or a positive number, got {self.logit_soft_cap!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        for name in ("tie_embeddings", "use_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if not isinstance(self.layer_options, dict):
            raise ValueError(f"layer_options: expected a dict letter -> options, got {self.layer_options!r}")
        for letter, options in self.layer_options.items():
            if letter not in kinds:
                raise ValueError(f"layer_options: expected keys among {list(kinds)}, got {letter!r}")
            kinds[letter].options.from_dict(letter, options)  # rejects unknown option names

    # ------------------------------------------------------------------ (de)serialization
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict; unknown keys are rejected with the list of valid keys."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a dict, got {type(d).__name__}")
        reject_unknown(d, cls.field_names(), "config")
        return cls(**d)

    @classmethod
    def from_saved(cls, d: dict[str, Any], version: int | None) -> ModelConfig:
        """Build from the fields of a checkpoint's config.json written under `version` (None: 1, before versions were
        written), so that an old checkpoint builds the layers it was trained with."""
        version = 1 if version is None else version
        if version not in (1, CONFIG_VERSION):
            raise ValueError(f"config_version: {version!r} is not supported by this revival (it reads 1 and "
                             f"{CONFIG_VERSION}); a newer revival wrote this checkpoint")
        if version == 1 and isinstance(d.get("pattern"), str) and isinstance(d.get("layer_options", {}), dict):
            d = dict(d)
            letters = set(d["pattern"])
            options = {letter: dict(v) for letter, v in d.get("layer_options", {}).items()}
            for letter in letters & set(_V1_OPTIONS):
                options[letter] = {**_V1_OPTIONS[letter], **options.get(letter, {})}
            if "s" in letters and options.get("s", {}).get("conv_kernel", d.get("slstm_conv_kernel", 4)) == 0:
                options["s"] = {"silu_without_conv": True, **options.get("s", {})}
            d["layer_options"] = options
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_options"] = {k: dict(v) for k, v in self.layer_options.items()}
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated, unknown keys rejected)."""
        reject_unknown(changes, self.field_names(), "config")
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0][:16]


def _letters_help() -> str:
    return ", ".join(f"{k.letter!r} ({k.name})" for k in layer_kinds().values())


def describe_layer_kinds(config: ModelConfig | None = None) -> str:
    """Every pattern letter: its block and its options with their defaults; a None option is derived from the model,
    and its value for `config` (default: `ModelConfig()`) is shown."""
    config = ModelConfig() if config is None else config
    return "\n".join(kind.describe(config) for kind in layer_kinds().values())
