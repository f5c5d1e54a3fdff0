"""Models: `ModelConfig`, `LanguageModel` (a block stack from a layer pattern), presets, save/load.

Pattern letters (one per block): m paper mLSTM, s paper sLSTM, x xLSTM-7B mLSTM, a Llama attention, g minGRU,
l minLSTM, M Mamba-2, d Gated DeltaNet; each is a layer kind declared beside its layer (revival/layers/kinds.py).
`describe_layer_kinds()` lists them with their blocks and options.
"""

from ..layers.kinds import LayerKind, layer_kinds
from .blocks import ResidualBlock, build_block
from .checkpoint import save_pretrained
from .config import PATTERN_LETTERS, ModelConfig, describe_layer_kinds
from .model import LanguageModel, format_count, from_pretrained, state_bytes
from .presets import PRESET_NAMES, preset_config, xlstm_pattern

__all__ = [
    "LanguageModel",
    "LayerKind",
    "ModelConfig",
    "PATTERN_LETTERS",
    "PRESET_NAMES",
    "ResidualBlock",
    "build_block",
    "describe_layer_kinds",
    "format_count",
    "from_pretrained",
    "layer_kinds",
    "preset_config",
    "save_pretrained",
    "state_bytes",
    "xlstm_pattern",
]
