"""revival: xLSTM and the recurrent revival in language modelling."""

__version__ = "0.1.0"

from . import ops  # noqa: E402
from .models import LanguageModel, ModelConfig, from_pretrained, preset_config  # noqa: E402

__all__ = ["LanguageModel", "ModelConfig", "__version__", "from_pretrained", "ops", "preset_config"]
