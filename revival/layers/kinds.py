"""Layer kinds: one declaration per kind of block, in the layer's own file.

A model's `pattern` has one letter per block. Each letter is a *layer kind*, declared beside its layer as

    @dataclass(frozen=True)
    class Mamba2Options(LayerOptions):
        d_state: int = 128
        head_dim: int | None = None      # None: expand * d_model / num_heads
        chunk_size: int | None = None    # None: the model's chunk_size
        ...
        def derive(self, config):        # the sizes of the None fields, from the ModelConfig
            return dict(head_dim=self.expand * config.d_model // config.num_heads, chunk_size=config.chunk_size)

    LAYER_KINDS = (LayerKind(letter="M", name="Mamba-2 block", layer=Mamba2, options=Mamba2Options, norm="rms",
                             ffn="swiglu", preset="mamba2", bench_heads={"125m": 24, "1.3b": 32}),)

and everything else derives from these declarations: `ModelConfig`'s valid letters and their docs (`PATTERN_LETTERS`),
the block builder (`revival.models.blocks.build_block`), the single-kind presets (`preset="mamba2"`), the benchmark
sizes (`bench_heads`, `bench_tiny_options`). A block of kind K is

    x = x + K.layer(d_model, **options)(norm(x))
    x = x + ffn(ffn_norm(x))                      # when K.ffn is not None

with `options = K.options(**config.layer_options[letter]).resolve(config)`: the caller's options, then every field
still None that `derive` names computed from the model's fields *when the block is built* (so
`ModelConfig(pattern="MMMM", ...)` and `preset_config("mamba2", ...)` build the same layers, and
`replace(num_heads=...)` re-derives). The options dataclass lists every keyword of the layer's constructor.

How to add a layer kind (one new file + tests):
  1. Write `revival/layers/<name>.py` with the mixer: `Layer(d_model, **options)`, `forward(x (B, T, D), state=None)
     -> (y (B, T, D), state)`, `reset_parameters(*, block_index=0, num_blocks=1)` (or without arguments).
  2. In the same file, its options dataclass (subclass `LayerOptions`, frozen, one field per constructor keyword;
     None + `derive` for sizes that follow the model) and `LAYER_KINDS = (LayerKind(...),)` with an unused letter.
  3. Tests beside the others: tests/layers/test_<name>.py (the layer against its reference ops, prefill + steps ==
     one forward); the model-level tests in tests/models pick the new letter up from the registry.
`layer_kinds()` finds the declaration by scanning the modules of `revival.layers`; nothing else needs editing. Add a
line to revival/models/presets.py only for a multi-kind preset (a hybrid).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import reject_unknown
from .moe import MoEOptions

__all__ = ["LayerKind", "LayerOptions", "NORMS", "FFNS", "layer_kinds"]

NORMS = {"layer": "LayerNorm", "rms": "RMSNorm"}  # block pre-norm names (built by revival.models.blocks)
FFNS = {"swiglu": "SwiGLU", "gated_mlp": "GatedMLP"}  # block feed-forward names (built by revival.models.blocks)


# options of the block around the layer that every kind takes in `layer_options[letter]` beside the layer's own
# (read by revival/models/blocks.py): "moe", None or a dict of MoEOptions (a mixture-of-experts feed-forward)
BLOCK_OPTIONS = ("moe",)


@dataclass(frozen=True)
class LayerOptions:
    """Base of a kind's options: one field per keyword of the layer's constructor (all but d_model)."""

    def derive(self, config: Any) -> dict[str, Any]:
        """Values for the fields that follow the model (`config` is the ModelConfig), used where the field is None."""
        return {}

    def resolve(self, config: Any) -> LayerOptions:
        """A copy with every None field that `derive` names filled in from `config`."""
        derived = self.derive(config)
        return dataclasses.replace(self, **{k: v for k, v in derived.items() if getattr(self, k) is None})

    @classmethod
    def listed_fields(cls) -> list[dataclasses.Field]:
        """The fields in the order users see them: the kind's own first, then those of a shared base (a dataclass
        puts a base's fields first, so DecayInitOptions' dt_min would lead Mamba-2's list)."""
        own = inspect.get_annotations(cls)
        fields = dataclasses.fields(cls)
        return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]

    def kwargs(self) -> dict[str, Any]:
        """The layer constructor's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, letter: str, options: dict[str, Any]) -> LayerOptions:
        """Options from `layer_options[letter]` (less the BLOCK_OPTIONS, checked here); unknown keys are rejected with
        the valid ones."""
        if not isinstance(options, dict):
            raise ValueError(f"layer_options[{letter!r}]: expected a dict of options, got {options!r}")
        valid = [f.name for f in cls.listed_fields()] + list(BLOCK_OPTIONS)
        reject_unknown(options, valid, f"layer_options[{letter!r}]", noun="option")
        if options.get("moe") is not None:
            MoEOptions.from_dict(letter, options["moe"])  # rejects unknown or invalid MoE options
        return cls(**{k: v for k, v in options.items() if k not in BLOCK_OPTIONS})


@dataclass(frozen=True)
class LayerKind:
    """The declaration of one block kind (see the module docstring)."""

    letter: str  # the pattern letter, one character
    name: str  # what the block is, e.g. "Mamba-2 block"
    layer: type  # the mixer class: layer(d_model, **options.kwargs())
    options: type[LayerOptions]  # its typed options (config.layer_options[letter] holds the caller's values)
    norm: str  # the pre-norm of the mixer and the feed-forward: a key of NORMS
    ffn: str | None  # the feed-forward after the mixer: a key of FFNS, or None (mixer only)
    preset: str | None = None  # a preset that stacks this kind alone on the Llama base (RMSNorm, SwiGLU)
    bench_heads: dict[str, int] = field(default_factory=dict)  # bench size -> num_heads (default 4)
    bench_tiny_options: dict[str, Any] = field(default_factory=dict)  # layer_options at the "tiny" bench size

    def __post_init__(self) -> None:
        if not isinstance(self.letter, str) or len(self.letter) != 1:
            raise ValueError(f"letter: expected one character, got {self.letter!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {list(NORMS)}, got {self.norm!r}")
        if self.ffn is not None and self.ffn not in FFNS:
            raise ValueError(f"ffn: expected None or one of {list(FFNS)}, got {self.ffn!r}")
        if not (isinstance(self.options, type) and issubclass(self.options, LayerOptions)):
            raise ValueError(f"options: expected a LayerOptions dataclass, got {self.options!r}")

    @property
    def equation(self) -> str:
        """The block as a formula, e.g. "x + Mamba2(RMSNorm(x)); x + SwiGLU(RMSNorm(x))"."""
        norm = NORMS[self.norm]
        mixer = f"x + {self.layer.__name__}({norm}(x))"
        return mixer if self.ffn is None else f"{mixer}; x + {FFNS[self.ffn]}({norm}(x))"

    def build_options(self, config: Any) -> LayerOptions:
        """The options a block of this kind gets in a model of `config`: the caller's, then the derived sizes."""
        return self.options.from_dict(self.letter, config.layer_options.get(self.letter, {})).resolve(config)

    def describe(self, config: Any) -> str:
        """A few lines for the docs: letter, block, options with defaults (None: derived, shown for `config`)."""
        lines = [f"{self.letter}  {self.name}: {self.equation}"]
        derived = self.options().derive(config)
        for f in self.options.listed_fields():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            note = f" (derived: {derived[f.name]!r} here)" if default is None and f.name in derived else ""
            lines.append(f"     {f.name} = {default!r}{note}")
        return "\n".join(lines)


@functools.cache
def layer_kinds() -> Mapping[str, LayerKind]:
    """letter -> LayerKind, from the `LAYER_KINDS` of every module of `revival.layers` (in module-name order)."""
    package = importlib.import_module(__package__)
    kinds: dict[str, LayerKind] = {}
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__package__}.{module_info.name}")
        for kind in getattr(module, "LAYER_KINDS", ()):
            if kind.letter in kinds:
                raise ValueError(f"letter: {kind.letter!r} is declared twice ({kinds[kind.letter].layer.__name__} "
                                 f"and {kind.layer.__name__}, in revival/layers/{module_info.name}.py)")
            kinds[kind.letter] = kind
    return MappingProxyType(kinds)
