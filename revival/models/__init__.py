"""Models: `ModelConfig`, `LanguageModel` (a block stack from a layer pattern), presets, save/load.

Pattern letters (one per block): m paper mLSTM, s paper sLSTM, x xLSTM-7B mLSTM, a Llama attention, g minGRU,
l minLSTM, M Mamba-2, d Gated DeltaNet. See `revival.models.config` for the block equations.
"""

from .blocks import BLOCK_BUILDERS, ResidualBlock, build_block
from .checkpoint import from_pretrained, save_pretrained
from .config import PATTERN_LETTERS, ModelConfig
from .model import LanguageModel, format_count, state_bytes
from .presets import PRESET_NAMES, preset_config, xlstm_pattern

__all__ = [
    "BLOCK_BUILDERS",
    "LanguageModel",
    "ModelConfig",
    "PATTERN_LETTERS",
    "PRESET_NAMES",
    "ResidualBlock",
    "build_block",
    "format_count",
    "from_pretrained",
    "preset_config",
    "save_pretrained",
    "state_bytes",
    "xlstm_pattern",
]
