"""The xLSTM-7B ("large") mLSTM layer: dense q/k/v, sigmoid output gate, soft-capped exponential gates, per-head norm.

Computation (docs/math.md "The xLSTM blocks", the Hugging Face `xLSTMLayer` semantics), x: (B, T, D):

    q = W_q x  (B, T, H, Dk),  k = W_k x  (B, T, H, Dk),  v = W_v x  (B, T, H, Dv)
    i = cap * tanh((W_i x + b_i) / cap),  f = cap * tanh((W_f x + b_f) / cap)      (B, T, H), cap = gate_soft_cap
    h = mlstm(q, k, v, i, f)                                                         (B, T, H, Dv)
    y = W_out( sigmoid(W_o x) * MultiHeadLayerNorm(h) )                              (B, T, D)

Dk = int(D * qk_dim_factor) / H, Dv = int(D * v_dim_factor) / H. The per-head norm is a LayerNorm over each head's Dv
features (mean subtracted, eps = norm_eps) followed by one weight (and a bias when use_bias) over all H * Dv features.
The gate projections always have a bias; the other projections and the per-head norm have one only when use_bias.
Parameter names mirror the Hugging Face checkpoint: q, k, v, ogate_preact, igate_preact, fgate_preact,
multihead_norm, out_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._documents import check_document_starts, drop_state_at_first_start
from ..ops.fused import gated_head_norm, soft_cap
from ..ops.mlstm import IMPLS, PRECISIONS, MLSTMState, mlstm, mlstm_step
from .ffn import small_init_, wang_init_
from .kinds import LayerKind, LayerOptions
from .linear import linear_many
from .norms import MultiHeadNorm

__all__ = ["XLSTMLargeLayer"]


class XLSTMLargeLayer(nn.Module):
    """xLSTM-7B mLSTM mixer (no residual, no pre-norm). forward(x: (B, T, D), state=None) -> (y, state).

    state = (C (B, H, Dk, Dv), n (B, H, Dk), m (B, H)) in float32 (float64 for float64 inputs); None means zeros.
    `eps` is the mLSTM denominator epsilon (Hugging Face config key `eps`).
    """

    def __init__(self, d_model: int, num_heads: int, qk_dim_factor: float = 0.5, v_dim_factor: float = 1.0,
                 gate_soft_cap: float | None = 15.0, norm_eps: float = 1e-6, use_bias: bool = False,
                 chunk_size: int = 64, impl: str = "auto", *, eps: float = 1e-6, precision: str = "auto"):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads: expected >= 1, got {num_heads}")
        qk_dim, v_dim = int(d_model * qk_dim_factor), int(d_model * v_dim_factor)
        if qk_dim < num_heads or qk_dim % num_heads:
            raise ValueError(f"qk_dim_factor: int(d_model * qk_dim_factor) = {qk_dim} must be a positive multiple of "
                             f"num_heads={num_heads} (d_model={d_model}, qk_dim_factor={qk_dim_factor})")
        if v_dim < num_heads or v_dim % num_heads:
            raise ValueError(f"v_dim_factor: int(d_model * v_dim_factor) = {v_dim} must be a positive multiple of "
                             f"num_heads={num_heads} (d_model={d_model}, v_dim_factor={v_dim_factor})")
        if gate_soft_cap is not None and gate_soft_cap <= 0:
            raise ValueError(f"gate_soft_cap: expected a positive float or None, got {gate_soft_cap}")
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        self.precision = precision  # the Triton kernels' precision preset for 16-bit inputs (revival.ops.mlstm)
        if chunk_size < 8 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two >= 8, got {chunk_size}")
        self.d_model, self.num_heads = d_model, num_heads
        self.qk_dim, self.v_dim = qk_dim, v_dim
        self.qk_head_dim, self.v_head_dim = qk_dim // num_heads, v_dim // num_heads
        self.gate_soft_cap, self.chunk_size, self.impl, self.eps = gate_soft_cap, chunk_size, impl, eps

        self.q = nn.Linear(d_model, qk_dim, bias=use_bias)
        self.k = nn.Linear(d_model, qk_dim, bias=use_bias)
        self.v = nn.Linear(d_model, v_dim, bias=use_bias)
        self.ogate_preact = nn.Linear(d_model, v_dim, bias=use_bias)
        self.igate_preact = nn.Linear(d_model, num_heads, bias=True)
        self.fgate_preact = nn.Linear(d_model, num_heads, bias=True)
        self.multihead_norm = MultiHeadNorm(num_heads, self.v_head_dim, eps=norm_eps, kind="layer", bias=use_bias)
        self.out_proj = nn.Linear(v_dim, d_model, bias=use_bias)
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """xLSTM-7B init: small init for q/k/v/o, gate weights 0, input-gate bias -10, forget-gate bias
        linspace(3, 6) over heads, Wang init (depth `num_blocks`) for out_proj, other biases 0, norm weight 1."""
        for linear in (self.q, self.k, self.v, self.ogate_preact):
            small_init_(linear.weight, self.d_model)
        wang_init_(self.out_proj.weight, self.d_model, num_blocks)
        for linear in (self.q, self.k, self.v, self.ogate_preact, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        with torch.no_grad():
            self.igate_preact.weight.zero_()
            self.fgate_preact.weight.zero_()
            self.igate_preact.bias.fill_(-10.0)
            self.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        self.multihead_norm.reset_parameters()

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft-capped input and forget gate pre-activations (B, T, H) each, computed in float32 (float64 for float64
        inputs), as one product.

        The gates enter exponentially: a bfloat16 rounding of a pre-activation near the cap (15) is an absolute
        error of ~0.03, i.e. a 3% error in the input weight exp(i). The projection has only 2 H outputs, so doing it
        in float32 costs little and cuts the bfloat16 error of h several-fold.
        """
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):  # autocast would run it in 16 bits
            weight = torch.cat([self.igate_preact.weight, self.fgate_preact.weight])
            bias = torch.cat([self.igate_preact.bias, self.fgate_preact.bias]).to(dtype)
            if _float32_output_product_applies(x, weight):
                # 16-bit x and weights: their products are exact in float32, so a 16-bit product with float32
                # accumulation and output is the same float32 product, without copying x to float32
                rows = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
                preact = (rows + bias).view(*x.shape[:-1], weight.shape[0])
            else:
                preact = F.linear(x.to(dtype), weight.to(dtype), bias)
            i, f = soft_cap(preact, self.gate_soft_cap).chunk(2, dim=-1)
        return i, f

    def forward(self, x: torch.Tensor, state: MLSTMState | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, MLSTMState]:
        """document_starts (B, T) bool or None: the cell state restarts at each document."""
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        document_starts = check_document_starts(document_starts, B, T, x.device)
        state = drop_state_at_first_start(state, document_starts)
        H = self.num_heads
        q, k, v, o = linear_many(x, [self.q, self.k, self.v, self.ogate_preact])
        q = q.view(B, T, H, self.qk_head_dim).transpose(1, 2)  # (B, H, T, Dk)
        k = k.view(B, T, H, self.qk_head_dim).transpose(1, 2)
        v = v.view(B, T, H, self.v_head_dim).transpose(1, 2)  # (B, H, T, Dv)
        i, f = (gate.transpose(1, 2) for gate in self._gates(x))  # (B, H, T)
        if T == 1:
            h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], state, eps=self.eps)
            h = h[:, :, None]
        else:
            h, state = mlstm(q, k, v, i, f, state, impl=self.impl, chunk_size=self.chunk_size, eps=self.eps,
                             precision=self.precision, document_starts=document_starts)
        norm = self.multihead_norm
        # sigmoid(o) * MultiHeadNorm(h) in one pass on CUDA, in h's dtype (under autocast: 16 bits, as out_proj takes)
        h = gated_head_norm(h.transpose(1, 2), o, norm.weight, norm.bias, norm.eps)  # (B, T, H * Dv)
        y = self.out_proj(h)
        return y, state


def _float32_output_product_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`torch.mm(..., out_dtype=torch.float32)` (CUDA only) for 16-bit x and weights, without autograd."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))


@dataclass(frozen=True)
class XLSTMLargeOptions(LayerOptions):
    """Options of letter x (`layer_options["x"]`); None: the ModelConfig field in the comment."""

    num_heads: int | None = None  # num_heads
    qk_dim_factor: float | None = None  # qk_dim_factor
    v_dim_factor: float | None = None  # v_dim_factor
    gate_soft_cap: float | None = None  # gate_soft_cap
    norm_eps: float | None = None  # norm_eps
    use_bias: bool | None = None  # use_bias
    chunk_size: int | None = None  # chunk_size
    impl: str | None = None  # mlstm_impl
    eps: float = 1e-6  # the mLSTM denominator epsilon (Hugging Face config key `eps`)
    precision: str | None = None  # mlstm_precision

    def derive(self, config):
        return dict(num_heads=config.num_heads, qk_dim_factor=config.qk_dim_factor, v_dim_factor=config.v_dim_factor,
                    gate_soft_cap=config.gate_soft_cap, norm_eps=config.norm_eps, use_bias=config.use_bias,
                    chunk_size=config.chunk_size, impl=config.mlstm_impl, precision=config.mlstm_precision)


LAYER_KINDS = (LayerKind(letter="x", name="xLSTM-7B block", layer=XLSTMLargeLayer, options=XLSTMLargeOptions,
                         norm="rms", ffn="swiglu", bench_heads={"125m": 4, "1.3b": 4}),)
