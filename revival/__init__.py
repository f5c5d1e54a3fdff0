"""revival: xLSTM and the recurrent revival in language modelling."""

from . import ops

__version__ = "0.1.0"

__all__ = ["ops", "__version__"]
