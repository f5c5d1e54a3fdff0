"""ParaGRU and ParaLSTM mixers (ParaRNN, Danieli et al. 2025): nonlinear RNNs trained in parallel by Newton's method.

    pre = W_in x + b                      (B, T, 3, d_inner): the three gate pre-activations, one matmul
    h = newton_solve(cell, pre, h0, ...)  the nonlinear recurrence over the whole sequence (revival.ops.newton)
    y = W_out h                           W_out only when d_inner != d_model (or proj_out=True)

ParaGRU (letter G): h' = (1 - z) h + z tanh(x_h + a_h (r h)), z / r sigmoid gates with diagonal state weights a.
ParaLSTM (letter L): coupled input-forget gate and diagonal peepholes, state [c, h] per unit, output h.
Equations in docs/math.md and revival/ops/newton/cells.py. The state weights are diagonal, so each Newton step
is one scan with diagonal (ParaGRU) or 2 x 2 block (ParaLSTM) Jacobians: Triton kernels on CUDA.

forward(x: (B, T, d_model), state=None) -> (y, state); state: h (B, d_inner) for ParaGRU, (B, d_inner, 2) = [c, h]
for ParaLSTM, float32 (float64 for float64 weights). `last_result` holds the solver's record of the last forward
(iterations, residual, converged, fell_back). Options: method ("deer", "quasi", "elk"), max_iters (None: T, which
always converges; ParaRNN trains with 3), tol, on_failure ("sequential": exact whatever happens; "return": keep
the iterate after max_iters, as ParaRNN's fixed-iteration training; "raise").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.newton import METHODS, ON_FAILURE, PARAGRU, PARALSTM, newton_solve
from .ffn import small_init_, wang_init_
from .kinds import LayerKind, LayerOptions

__all__ = ["ParaGRU", "ParaLSTM"]


class _ParaRNN(nn.Module):
    cell = PARAGRU
    state_tail: tuple[int, ...] = ()  # trailing state dims after d_inner

    def __init__(self, d_model: int, *, expansion: float = 1.0, proj_out: bool | None = None, bias: bool = False,
                 method: str = "deer", max_iters: int | None = None, tol: float | None = None,
                 on_failure: str = "sequential"):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model: expected >= 1, got {d_model}")
        if expansion <= 0:
            raise ValueError(f"expansion: expected > 0, got {expansion}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure: expected one of {ON_FAILURE}, got {on_failure!r}")
        self.d_model, self.d_inner = d_model, max(1, round(expansion * d_model))
        self.method, self.max_iters, self.tol, self.on_failure = method, max_iters, tol, on_failure
        self.in_proj = nn.Linear(d_model, 3 * self.d_inner, bias=bias)
        self.gate_bias = nn.Parameter(torch.zeros(3, self.d_inner))
        self.state_weight = nn.Parameter(torch.zeros(3, self.d_inner))  # the diagonal state matrices
        proj_out = self.d_inner != d_model if proj_out is None else proj_out
        if not proj_out and self.d_inner != d_model:
            raise ValueError(f"proj_out: False needs d_inner == d_model, got d_inner={self.d_inner}, d_model={d_model}")
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias) if proj_out else None
        self.last_result = None
        self._make_cell_parameters()
        self.reset_parameters()

    def _make_cell_parameters(self) -> None:
        """Parameters beyond the shared ones (ParaLSTM: the peepholes)."""

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        small_init_(self.in_proj.weight, self.d_model)
        if self.in_proj.bias is not None:
            nn.init.zeros_(self.in_proj.bias)
        if self.out_proj is not None:
            wang_init_(self.out_proj.weight, self.d_model, num_blocks)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)
        with torch.no_grad():
            self.state_weight.uniform_(-0.5, 0.5)
            self.gate_bias.zero_()
            self._init_gate_bias()

    def _init_gate_bias(self) -> None:
        raise NotImplementedError

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return (self.state_weight,)

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                document_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """document_starts: (B, T) bool or None; the state restarts from zeros at each start (packed documents)."""
        if x.ndim != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"x: expected shape (B, T >= 1, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        dtype = torch.float64 if self.state_weight.dtype == torch.float64 else torch.float32
        want = (B, self.d_inner, *self.state_tail)
        if state is None:
            state = torch.zeros(want, dtype=dtype, device=x.device)
        elif tuple(state.shape) != want:
            raise ValueError(f"state: expected shape {want}, got {tuple(state.shape)}")
        pre = self.in_proj(x).view(B, T, 3, self.d_inner)
        pre = pre + self.gate_bias.to(pre.dtype)
        h, self.last_result = newton_solve(self.cell, pre, state, self._weights(), method=self.method,
                                           tol=self.tol, max_iters=self.max_iters, on_failure=self.on_failure,
                                           document_starts=document_starts)
        y = self._output(h).to(x.dtype)
        return (y if self.out_proj is None else self.out_proj(y)), h[:, -1]


class ParaGRU(_ParaRNN):
    """ParaRNN's GRU with diagonal state weights (see the module doc); pre-activations ordered (z, r, h)."""

    cell = PARAGRU

    def _init_gate_bias(self) -> None:
        # update gate biased towards keeping the state, spread over time scales (z = sigmoid(-1) .. sigmoid(-4))
        self.gate_bias[0] = -torch.linspace(1.0, 4.0, self.d_inner)


class ParaLSTM(_ParaRNN):
    """ParaRNN's LSTM: coupled input-forget gate, diagonal peepholes; pre-activations ordered (f, o, c)."""

    cell = PARALSTM
    state_tail = (2,)

    def _make_cell_parameters(self) -> None:
        self.peephole = nn.Parameter(torch.zeros(2, self.d_inner))

    def _init_gate_bias(self) -> None:
        self.gate_bias[0] = torch.linspace(1.0, 4.0, self.d_inner)  # forget gate open: long memory
        self.peephole.uniform_(-0.1, 0.1)

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return (self.state_weight, self.peephole)

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        return h[..., 1]


@dataclass(frozen=True)
class ParaRNNOptions(LayerOptions):
    """Options of letters G and L (`layer_options["G"]` / `["L"]`); None: derived (see `derive`)."""

    expansion: float = 1.0
    proj_out: bool | None = None  # None: an out-projection when d_inner != d_model (the layer decides)
    bias: bool | None = None  # use_bias
    method: str = "deer"
    max_iters: int | None = None  # None: T (always converges)
    tol: float | None = None  # None: the solver's default for the dtype
    on_failure: str = "sequential"

    def derive(self, config):
        return dict(bias=config.use_bias)


LAYER_KINDS = (
    LayerKind(letter="G", name="ParaGRU block", layer=ParaGRU, options=ParaRNNOptions, norm="rms", ffn="swiglu",
              preset="paragru", bench_heads={"125m": 4, "1.3b": 4}),
    LayerKind(letter="L", name="ParaLSTM block", layer=ParaLSTM, options=ParaRNNOptions, norm="rms", ffn="swiglu",
              preset="paralstm", bench_heads={"125m": 4, "1.3b": 4}),
)
