"""minLSTM mixer layer ("Were RNNs All We Needed?", arXiv 2410.01201).

    u = x + conv(x)                      optional causal depthwise conv (the paper's LM setup), conv_kernel=0: u = x
    (hidden, forget, input) = W_in u     each of width d_inner = round(expansion * d_model)
    f = sigmoid(forget), i = sigmoid(input), f' = f / (f + i), i' = i / (f + i)
    h_t = f'_t h_{t-1} + i'_t g(hidden_t)                               (log-space parallel scan)
    y = W_out h                          W_out only when d_inner != d_model (or proj_out=True)

The mixer only (no residual, outer norm or MLP). forward(x: (B, T, d_model), state=None) -> (y, state) with
state = (conv_state: (B, max(conv_kernel - 1, 0), d_model), h: (B, d_inner)), h in float32 (float64 for float64
weights); constant in T. A single-token call with a state takes a direct step. Constructor as `MinGRU` (scan_impl
"auto" runs the Triton kernels on CUDA, as there).
"""

from __future__ import annotations

from ..ops.linear_scan import minlstm_scan, minlstm_step
from .kinds import LayerKind
from .mingru import MinGRUOptions, MinRNNBase

__all__ = ["MinLSTM"]


class MinLSTM(MinRNNBase):
    """minLSTM mixer: in-projection to (hidden, forget, input), log-space scan, optional out-projection."""

    num_branches = 3

    def _scan(self, hidden, forget, input, h0, document_starts=None):
        return minlstm_scan(forget, input, hidden, h0, impl=self.scan_impl, chunk_size=self.chunk_size,
                            document_starts=document_starts)

    def _step(self, hidden, forget, input, h):
        return minlstm_step(forget, input, hidden, h)


LAYER_KINDS = (LayerKind(letter="l", name="minLSTM block", layer=MinLSTM, options=MinGRUOptions, norm="rms",
                         ffn="swiglu", preset="minlstm", bench_heads={"125m": 4, "1.3b": 4}),)
