"""Causal depthwise 1-d convolution over time whose state (the last K - 1 inputs) carries across calls.

`causal_conv1d(x, weight, bias, state, activation=None, document_starts=None)` -> (y, new_state):
x (B, T, D), weight (D, K), bias (D,) or None, state (B, K-1, D) or None (zeros). With padded = cat(state, x) along
time, y_t = sum_j weight[:, j] * padded[t + j] + bias, then SiLU if activation == "silu" (one autograd node). The new
state is the last K - 1 steps of padded (raw inputs, before any activation). All in x's dtype.

With `document_starts` (B, T) bool, tap j only reads inputs of the output's own document (the window never reaches
across a start; the carried state counts as the first document's); the returned state keeps only the last document's
inputs (zeros before it), so a continuation sees no earlier document.

Forms: `reference.py` (the definition, one step at a time: the float64 reference of the tests), `shifted.py`
(impl="shifted": K shifted multiply-adds with a hand-written backward; without autograd, as in decoding, the same
multiply-adds run directly, since the Function's bookkeeping is most of a step's cost) and `triton.py`
(impl="triton": one forward and one backward kernel, document starts included). impl="auto" takes "triton" on CUDA
for 16/32-bit x when Triton runs, except a one-token step without autograd (decoding), which stays "shifted"
until benchmarks/gpu_conv.py's decode row says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_floating, check_shape
from .._documents import check_document_starts
from .._triton import available
from .reference import causal_conv1d_reference
from .shifted import CausalConvFunction, conv_documents, conv_forward

__all__ = ["ACTIVATIONS", "IMPLS", "causal_conv1d", "causal_conv1d_reference"]

ACTIVATIONS = (None, "silu")
IMPLS = ("auto", "shifted", "triton")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _resolve_impl(impl, x: torch.Tensor, needs_grad: bool) -> str:
    """`impl` checked against IMPLS; "auto": "triton" on CUDA for 16/32-bit x where Triton runs, but "shifted" for
    a one-token step without autograd (see the module doc) and everywhere else."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "triton" and not available():
        raise ValueError(f"impl: 'triton' is not available here (device {x.device.type}); use 'auto' or 'shifted'")
    if impl == "auto":
        steps = x.shape[1]
        fits = x.device.type == "cuda" and x.dtype in _TRITON_DTYPES and ((needs_grad and steps > 0) or steps > 1)
        impl = "triton" if fits and available() else "shifted"
    return impl


def _last_inputs(x, state, K, document_starts):
    """The new state: the last K - 1 steps of cat(state, x), zero where they precede the row's last start."""
    B, T, D = x.shape
    if T >= K - 1:
        last = x[:, T - (K - 1):].contiguous()  # a copy: a view would keep all of x alive
    else:
        previous = x.new_zeros(B, K - 1, D) if state is None else state
        last = torch.cat([previous, x], dim=1)[:, T:]
    if document_starts is None or K == 1:
        return last
    steps = torch.arange(T, device=x.device)
    last_start = torch.where(document_starts, steps, -K).amax(dim=1, keepdim=True)  # -K: no start in the row
    keep = torch.arange(T - (K - 1), T, device=x.device) >= last_start  # (B, K-1)
    return last * keep[..., None]


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, state: torch.Tensor | None = None, *,
    activation: str | None = None, document_starts: torch.Tensor | None = None, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv (see the module doc). Returns (y (B, T, D), new state (B, K-1, D)). `impl`: "auto",
    "shifted" or "triton" (see the module doc)."""
    check_floating("x", x)
    if x.ndim != 3:
        raise ValueError(f"x: expected shape (B, T, D), got {tuple(x.shape)}")
    B, T, D = x.shape
    check_floating("weight", weight)
    if weight.ndim != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"weight: expected shape ({D}, K >= 1), got {tuple(weight.shape)}")
    K = weight.shape[1]
    if bias is not None:
        check_shape("bias", bias, (D,))
    if state is not None and tuple(state.shape) != (B, K - 1, D):
        raise ValueError(f"state: expected shape {(B, K - 1, D)}, got {tuple(state.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    document_starts = check_document_starts(document_starts, B, T, x.device)
    silu = activation == "silu"
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, state, weight, bias))
    if _resolve_impl(impl, x, needs_grad) == "triton":
        from .triton import causal_conv1d_triton

        y = causal_conv1d_triton(x, weight, bias, state, silu=silu, document_starts=document_starts)
        return y, _last_inputs(x, state, K, document_starts)
    if document_starts is not None:
        y = conv_documents(x, state, weight, bias, document_starts)
        return (F.silu(y) if silu else y), _last_inputs(x, state, K, document_starts)
    if needs_grad:
        y = CausalConvFunction.apply(x, state, weight, bias, silu)
    else:
        y = conv_forward(x, state, weight, bias)
        if silu:
            y = F.silu(y, inplace=True)
    return y, _last_inputs(x, state, K, None)
