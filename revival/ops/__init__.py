"""Pure functions over tensors: the math. No nn.Module, no config."""

from .mlstm import mlstm, mlstm_step

__all__ = ["mlstm", "mlstm_step"]
