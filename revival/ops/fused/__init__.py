"""Fused elementwise output stages: each a Triton kernel (CUDA) beside its PyTorch reference in one file.

`soft_cap` (logit / gate soft-capping), `gated_head_norm` (the xLSTM-7B layer's sigmoid(o) * per-head norm) and
`swiglu` (SwiGLU's silu(gate) * up on the packed up-projection).
"""

from .gated_head_norm import gated_head_norm, gated_head_norm_reference
from .soft_cap import soft_cap, soft_cap_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "gated_head_norm",
    "gated_head_norm_reference",
    "soft_cap",
    "soft_cap_reference",
    "swiglu",
    "swiglu_reference",
]
