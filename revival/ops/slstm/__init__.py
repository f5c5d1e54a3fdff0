"""The sLSTM op: `slstm` over a sequence, `slstm_step` for one token (math in docs/math.md, "sLSTM").

    x_gates:          (B, T, 4, H, d)  input contributions `W x_t + b` to the pre-activations, gate order (i, f, z, o)
    recurrent_weight: (4, H, d, d)     block-diagonal: raw[:, g, h, :] += y_prev[:, h, :] @ recurrent_weight[g, h]
    state:            (c, n, m, y)     each (B, H, d); None means zeros (the first step then sets m = i, per unit)

Outputs follow x_gates' dtype; states are float32 (float64 for float64 inputs). The recurrence itself runs in float32
(float64) with autocast disabled.
"""

from __future__ import annotations

import torch

from .._checks import check_floating, check_shape
from .._common import compute_dtype
from .._documents import check_document_starts
from .._triton import available as _triton_available
from .fused import slstm_fused
from .reference import SLSTMState, slstm_reference, slstm_step_reference

__all__ = ["slstm", "slstm_step", "SLSTMState", "IMPLS"]

IMPLS = ("auto", "reference", "fused", "triton", "newton")
_STATE_NAMES = ("c", "n", "m", "y")
# torch.compile runs the fused recurrence eagerly: a Python loop over T with data-dependent checks of the document
# starts, which dynamo would unroll per length; this makes it one clean graph break per call.
_slstm_fused_opaque = torch.compiler.disable(
    slstm_fused, reason="revival: the fused sLSTM autograd.Function runs eagerly under torch.compile")


def _resolve_impl(impl: str, x_gates: torch.Tensor) -> str:
    """"auto": the Triton kernels on CUDA (float64 stays on "fused", which the kernels do not take), else "fused"."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        on_gpu = x_gates.device.type == "cuda" and x_gates.dtype != torch.float64 and _triton_available()
        return "triton" if on_gpu else "fused"
    if impl == "triton" and not _triton_available():
        raise ValueError(f"impl: 'triton' is not available here (device {x_gates.device.type}); use 'auto' or 'fused'")
    if impl == "triton" and x_gates.dtype == torch.float64:
        raise ValueError("x_gates: impl='triton' supports float32/bfloat16/float16, got torch.float64")
    return impl


def _validate_weight(recurrent_weight: torch.Tensor, H: int, d: int) -> None:
    check_shape("recurrent_weight", recurrent_weight, (4, H, d, d))


def _prepare_state(state, B: int, H: int, d: int, like: torch.Tensor, dtype: torch.dtype) -> SLSTMState:
    if state is None:
        zeros = torch.zeros(B, H, d, device=like.device, dtype=dtype)
        return (zeros, zeros, zeros, zeros)
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        got = f"a {type(state).__name__} of length {len(state)}" if isinstance(state, (tuple, list)) else type(state)
        raise ValueError(f"state: expected a tuple (c, n, m, y) of (B, H, d) tensors or None, got {got}")
    for index, (name, tensor) in enumerate(zip(_STATE_NAMES, state)):
        check_shape(f"state[{index}] ({name})", tensor, (B, H, d))
    return tuple(s.to(dtype) for s in state)


def slstm(
    x_gates: torch.Tensor,
    recurrent_weight: torch.Tensor,
    state: SLSTMState | None = None,
    *,
    impl: str = "auto",
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """sLSTM over a sequence.

    x_gates: (B, T, 4, H, d) gate input contributions (i, f, z, o); recurrent_weight: (4, H, d, d);
    state: (c, n, m, y) each (B, H, d), or None for zeros. Returns y (B, T, H, d) in x_gates' dtype and the final
    state. `impl`: "auto" ("triton" on CUDA for non-float64 inputs, else "fused"), "reference" (plain loop,
    autograd), "fused" (batched step with a hand-written backward), "triton" (GPU kernels, `triton.py`) or
    "newton" (parallel over T by Newton's method, exact (falls back to the loop if it does not converge); see
    revival/ops/newton/slstm.py).
    document_starts: (B, T) bool or None; the state (c, n, m, y) is zero before each start, so a packed row equals
    separate calls per document (revival/ops/_documents.py); every impl takes them.
    """
    check_floating("x_gates", x_gates)
    if x_gates.ndim != 5 or x_gates.shape[2] != 4 or x_gates.shape[1] == 0:
        raise ValueError(f"x_gates: expected shape (B, T >= 1, 4, H, d), got {tuple(x_gates.shape)}")
    B, T, _, H, d = x_gates.shape
    document_starts = check_document_starts(document_starts, B, T, x_gates.device)
    impl = _resolve_impl(impl, x_gates)
    _validate_weight(recurrent_weight, H, d)
    dtype = compute_dtype(x_gates)
    state = _prepare_state(state, B, H, d, x_gates, dtype)
    if impl == "triton":  # reads x_gates in its own dtype; states and gate math in float32
        from .triton import slstm_triton

        device_type = x_gates.device.type
        if x_gates.dtype == torch.float32 and torch.is_autocast_enabled(device_type):
            # as any matmul under autocast: the products y_{t-1} R in the autocast dtype (bf16/fp16)
            x_gates = x_gates.to(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return slstm_triton(x_gates, recurrent_weight, state, document_starts=document_starts)
    args = (x_gates.to(dtype), recurrent_weight.to(dtype), state)
    with torch.autocast(x_gates.device.type, enabled=False):  # the recurrence runs in float32 (or float64)
        if impl == "newton":
            from ..newton import slstm_newton

            y, state, _ = slstm_newton(*args, on_failure="sequential", document_starts=document_starts)
        elif impl == "reference":
            y, state = slstm_reference(*args, document_starts)
        else:
            y, state = _slstm_fused_opaque(*args, document_starts)
    return y.to(x_gates.dtype), state


def slstm_step(
    x_gates_t: torch.Tensor,
    recurrent_weight: torch.Tensor,
    state: SLSTMState | None = None,
) -> tuple[torch.Tensor, SLSTMState]:
    """One token: x_gates_t (B, 4, H, d). Returns y_t (B, H, d) in x_gates_t's dtype and the new state."""
    check_floating("x_gates_t", x_gates_t)
    if x_gates_t.ndim != 4 or x_gates_t.shape[1] != 4:
        raise ValueError(f"x_gates_t: expected shape (B, 4, H, d), got {tuple(x_gates_t.shape)}")
    B, _, H, d = x_gates_t.shape
    _validate_weight(recurrent_weight, H, d)
    dtype = compute_dtype(x_gates_t)
    state = _prepare_state(state, B, H, d, x_gates_t, dtype)
    with torch.autocast(x_gates_t.device.type, enabled=False):
        y, state = slstm_step_reference(x_gates_t.to(dtype), recurrent_weight.to(dtype), state)
    return y.to(x_gates_t.dtype), state
