"""Fused elementwise output stages: each a Triton kernel (CUDA) beside its PyTorch reference in one file.

`soft_cap` (logit / gate soft-capping), `gated_head_norm` (a gate times a per-head norm: xLSTM-7B's sigmoid(o) *
LayerNorm, Gated DeltaNet's silu(gate) * RMSNorm), `l2_normalize_heads` (Gated DeltaNet's per-head L2 norm of q, k)
and `swiglu` (SwiGLU's silu(gate) * up on the packed up-projection).
"""

from .gated_head_norm import gated_head_norm, gated_head_norm_reference
from .l2_norm import l2_normalize_heads, l2_normalize_heads_reference
from .soft_cap import soft_cap, soft_cap_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "gated_head_norm",
    "gated_head_norm_reference",
    "l2_normalize_heads",
    "l2_normalize_heads_reference",
    "soft_cap",
    "soft_cap_reference",
    "swiglu",
    "swiglu_reference",
]
