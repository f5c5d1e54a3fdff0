"""Normalization layers: RMSNorm, LayerNorm (optional bias) and the per-head norm used after mLSTM/sLSTM cells."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 for 16-bit inputs (`F.rms_norm`: one fused kernel
    each way on CUDA) and rounded once to x's dtype; the weight is applied in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (the xLSTM paper blocks use none)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class MultiHeadNorm(nn.Module):
    """Normalize each head separately over its own features, then one weight over all H * d features.

    Input (..., H, d); output (..., H * d). `kind="layer"` subtracts the mean (group norm with H groups, as in the
    xLSTM paper blocks); `kind="rms"` does not. Computed in float32 for 16-bit inputs, rounded once to x's dtype.
    With one head the weight goes into the norm's own kernel (F.rms_norm / F.layer_norm: fused each way on CUDA)
    instead of a float32 multiply of its own, forward and backward.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, kind: str = "layer", bias: bool = False):
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"kind: expected 'layer' or 'rms', got {kind!r}")
        self.num_heads, self.head_dim, self.eps, self.kind = num_heads, head_dim, eps, kind
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if bias else None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normalize = F.layer_norm if self.kind == "layer" else F.rms_norm
        weight = self.weight.to(x32.dtype)
        if self.num_heads == 1:  # the (d,) weight is the norm's own: no separate float32 pass each way
            y = normalize(x32, (self.head_dim,), weight, eps=self.eps).flatten(-2)
        else:
            y = normalize(x32, (self.head_dim,), eps=self.eps).flatten(-2) * weight
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)
