"""minGRU mixer layer ("Were RNNs All We Needed?", arXiv 2410.01201), plus the base shared with minLSTM.

    u = x + conv(x)                      optional causal depthwise conv (the paper's LM setup), conv_kernel=0: u = x
    (hidden, gate) = W_in u              both of width d_inner = round(expansion * d_model)
    h_t = (1 - z_t) h_{t-1} + z_t g(hidden_t),  z = sigmoid(gate)      (log-space parallel scan)
    y = W_out h                          W_out only when d_inner != d_model (or proj_out=True)

The mixer only: no residual around it, no outer norm, no MLP (the model's block adds those).
forward(x: (B, T, d_model), state=None) -> (y: (B, T, d_model), state) with
state = (conv_state: (B, max(conv_kernel - 1, 0), d_model), h: (B, d_inner)), h in float32 (float64 for float64
weights); its size does not depend on T. A single-token call with a state takes a direct step.
scan_impl="auto" (default) runs the Triton kernels on CUDA and the log-space scan elsewhere: the in-projection by
cuBLAS, then the gates + scan in one kernel (revival.ops.linear_scan.triton).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.linear_scan import IMPLS as SCAN_IMPLS
from ..ops.linear_scan import mingru_scan, mingru_step
from ._inputs import check_mixer_input, unpack_state
from .conv import CausalConv1d
from .ffn import small_init_, wang_init_
from .kinds import LayerKind, LayerOptions

__all__ = ["MinGRU"]


class MinRNNBase(nn.Module):
    """Shared structure of MinGRU and MinLSTM; subclasses set `num_branches` and implement `_scan` / `_step`."""

    num_branches: int = 2

    def __init__(self, d_model: int, *, expansion: float = 1.5, conv_kernel: int = 4, proj_out: bool | None = None,
                 bias: bool = False, scan_impl: str = "auto", chunk_size: int = 64):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model: expected >= 1, got {d_model}")
        if expansion <= 0:
            raise ValueError(f"expansion: expected > 0, got {expansion}")
        if conv_kernel < 0:
            raise ValueError(f"conv_kernel: expected >= 0 (0 = no conv), got {conv_kernel}")
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"scan_impl: expected one of {SCAN_IMPLS}, got {scan_impl!r}")
        self.d_model, self.conv_kernel = d_model, conv_kernel
        self.d_inner = max(1, round(expansion * d_model))
        self.scan_impl, self.chunk_size = scan_impl, chunk_size
        self.conv = CausalConv1d(d_model, conv_kernel) if conv_kernel > 0 else None
        self.in_proj = nn.Linear(d_model, self.num_branches * self.d_inner, bias=bias)
        proj_out = self.d_inner != d_model if proj_out is None else proj_out
        if not proj_out and self.d_inner != d_model:
            raise ValueError(f"proj_out: False needs d_inner == d_model, got d_inner={self.d_inner}, d_model={d_model}")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias) if proj_out else None
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init for the in-projection, Wang init (depth `num_blocks`) for the out-projection, zero biases."""
        small_init_(self.in_proj.weight, self.d_model)
        linears = [self.in_proj]
        if self.out_proj is not None:
            wang_init_(self.out_proj.weight, self.d_model, num_blocks)
            linears.append(self.out_proj)
        for linear in linears:
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        if self.conv is not None:
            self.conv.reset_parameters()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        document_starts = check_mixer_input(x, self.d_model, document_starts)
        conv_state, h0 = unpack_state(state, ("conv_state", "h"), document_starts)
        if h0 is not None and tuple(h0.shape) != (x.shape[0], self.d_inner):
            raise ValueError(f"state[1] (h): expected shape {(x.shape[0], self.d_inner)}, got {tuple(h0.shape)}")
        if self.conv is not None:
            conv_out, conv_state = self.conv(x, conv_state, document_starts)
            u = x + conv_out
        else:
            u, conv_state = x, x.new_zeros(x.shape[0], 0, self.d_model)
        stepping = x.shape[1] == 1 and h0 is not None
        branches = self.in_proj(u).chunk(self.num_branches, dim=-1)
        if stepping:
            h_last = self._step(*(b[:, 0].to(h0.dtype) for b in branches), h0)
            h = h_last[:, None].to(x.dtype)
        else:
            h, h_last = self._scan(*branches, h0, document_starts=document_starts)
        y = h if self.out_proj is None else self.out_proj(h)
        return y, (conv_state, h_last)

    def _scan(self, *branches_and_h0):
        raise NotImplementedError

    def _step(self, *branches_and_h):
        raise NotImplementedError


class MinGRU(MinRNNBase):
    """minGRU mixer: in-projection to (hidden, gate), log-space scan, optional out-projection (see the module doc)."""

    num_branches = 2

    def _scan(self, hidden, gate, h0, document_starts=None):
        return mingru_scan(gate, hidden, h0, impl=self.scan_impl, chunk_size=self.chunk_size,
                           document_starts=document_starts)

    def _step(self, hidden, gate, h):
        return mingru_step(gate, hidden, h)


@dataclass(frozen=True)
class MinGRUOptions(LayerOptions):
    """Options of letter g (`layer_options["g"]`, also minLSTM's for letter l); None: derived (see `derive`)."""

    expansion: float = 1.5
    conv_kernel: int = 4
    proj_out: bool | None = None  # None: an out-projection when d_inner != d_model (the layer decides)
    bias: bool | None = None  # use_bias
    scan_impl: str = "auto"
    chunk_size: int | None = None  # chunk_size

    def derive(self, config):
        return dict(chunk_size=config.chunk_size, bias=config.use_bias)


LAYER_KINDS = (LayerKind(letter="g", name="minGRU block", layer=MinGRU, options=MinGRUOptions, norm="rms",
                         ffn="swiglu", preset="mingru", bench_heads={"125m": 4, "1.3b": 4}),)
