"""nn.Modules that own weights and call ops. Mixers: forward(x: (B, T, D), state=None) -> (y, state)."""

from .attention import Attention
from .conv import CausalConv1d
from .ffn import GatedMLP, SwiGLU
from .gated_deltanet import GatedDeltaNet
from .mamba2 import Mamba2
from .mingru import MinGRU
from .minlstm import MinLSTM
from .mlstm_layer import MLSTMLayer
from .norms import LayerNorm, MultiHeadNorm, RMSNorm
from .slstm_layer import SLSTMLayer
from .xlstm_large import XLSTMLargeLayer

__all__ = [
    "Attention",
    "CausalConv1d",
    "GatedDeltaNet",
    "GatedMLP",
    "LayerNorm",
    "MLSTMLayer",
    "Mamba2",
    "MinGRU",
    "MinLSTM",
    "MultiHeadNorm",
    "RMSNorm",
    "SLSTMLayer",
    "SwiGLU",
    "XLSTMLargeLayer",
]
