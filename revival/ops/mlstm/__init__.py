"""The mLSTM op: `mlstm` over a sequence, `mlstm_step` for one token (contract in docs/architecture.md, math in
docs/math.md)."""

from __future__ import annotations

import torch

from .._checks import check_floating, check_shape
from .._common import compute_dtype
from .._documents import check_document_starts
from .._triton import available as _triton_available
from .chunkwise import mlstm_chunkwise
from .reference import MLSTMState, mlstm_parallel, mlstm_recurrent, mlstm_step_reference
from .resets import resets_as_gates
from .triton.config import PRECISIONS, LaunchConfig, check_settings

__all__ = ["mlstm", "mlstm_step", "MLSTMState", "IMPLS", "PRECISIONS", "LaunchConfig"]

IMPLS = ("auto", "recurrent", "parallel", "chunkwise", "triton")


def _prepare_state(state, B: int, H: int, Dk: int, Dv: int, like: torch.Tensor, dtype: torch.dtype) -> MLSTMState:
    if state is None:
        return (
            torch.zeros(B, H, Dk, Dv, device=like.device, dtype=dtype),
            torch.zeros(B, H, Dk, device=like.device, dtype=dtype),
            torch.zeros(B, H, device=like.device, dtype=dtype),
        )
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise ValueError(f"state: expected a tuple (C, n, m) or None, got {type(state).__name__}")
    C, n, m = state
    for name, x, want in (("state[0] (C)", C, (B, H, Dk, Dv)), ("state[1] (n)", n, (B, H, Dk)),
                          ("state[2] (m)", m, (B, H))):
        if not _is_floating_of_shape(x, want):  # the detailed check (its error names the argument) only on a miss
            check_shape(name, x, want)
    # .to() of a tensor already in `dtype` returns it but costs a dispatch (~6 us of a decode step's host time)
    return tuple(x if x.dtype == dtype else x.to(dtype) for x in (C, n, m))


def _is_floating_of_shape(x, shape) -> bool:
    return isinstance(x, torch.Tensor) and x.shape == shape and x.is_floating_point()


def _validate(q, k, v, i, f, time_axis: bool) -> None:
    check_floating("q", q)
    expected_ndim = 4 if time_axis else 3
    if q.ndim != expected_ndim:
        layout = "(B, H, T, Dk)" if time_axis else "(B, H, Dk)"
        raise ValueError(f"q: expected shape {layout}, got {tuple(q.shape)}")
    lead = q.shape[:-1]  # (B, H, T) or (B, H)
    v_ok = isinstance(v, torch.Tensor) and v.shape[:-1] == lead and v.ndim == q.ndim and v.is_floating_point()
    if not (v_ok and _is_floating_of_shape(k, q.shape) and _is_floating_of_shape(i, lead)
            and _is_floating_of_shape(f, lead)):  # one cheap test; the checks below name the bad argument
        lead = tuple(lead)
        check_shape("k", k, (*lead, q.shape[-1]))
        check_shape("v", v, (*lead, None))
        check_shape("i", i, lead)
        check_shape("f", f, lead)
    if time_axis and q.shape[2] == 0:
        raise ValueError(f"q: expected a sequence length T >= 1, got shape {tuple(q.shape)}")


# torch.compile runs the chunkwise form eagerly: its autograd.Function caches masks per shape (lru_cache) and writes h
# through a strided `out=`, neither of which dynamo traces; this makes it one clean graph break per call.
_mlstm_chunkwise_opaque = torch.compiler.disable(
    mlstm_chunkwise, reason="revival: the chunkwise mLSTM autograd.Function runs eagerly under torch.compile")


def _check_chunk_size(chunk_size) -> None:
    is_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if not is_int or chunk_size < 8 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two >= 8 (an int), got {chunk_size!r}")


# "auto" uses the Triton kernels up to these head dims (their tuned range); above, "chunkwise" (PyTorch matmuls) is
# faster. Measured on an H100, bf16, (B, H, T) = (8, 4, 2048), forward+backward: Dk = Dv = 256 Triton 5.0 ms vs
# chunkwise 24.8 ms; Dk = Dv = 384 Triton 183 ms (tiles padded to 512 spill) vs chunkwise 26.2 ms.
AUTO_TRITON_MAX_DK, AUTO_TRITON_MAX_DV = 256, 512


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, Dk: int = 0, Dv: int = 0) -> str:
    """"auto": the Triton kernels on CUDA for head dims up to AUTO_TRITON_MAX_DK / _DV, else "chunkwise" (also for
    float64, which the kernels do not take)."""
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        on_gpu = device.type == "cuda" and dtype != torch.float64
        in_range = Dk <= AUTO_TRITON_MAX_DK and Dv <= AUTO_TRITON_MAX_DV
        return "triton" if on_gpu and in_range and _triton_available() else "chunkwise"
    if impl == "triton" and not _triton_available():
        raise ValueError(f"impl: 'triton' is not available here (device {device.type}); use 'auto' or 'chunkwise'")
    return impl


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    impl: str = "auto",
    chunk_size: int = 64,
    eps: float = 1e-6,
    document_starts: torch.Tensor | None = None,
    precision: str = "auto",
    launch: LaunchConfig | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """mLSTM over a sequence.

    q, k: (B, H, T, Dk); v: (B, H, T, Dv); i, f: (B, H, T) gate pre-activations; state: (C (B, H, Dk, Dv),
    n (B, H, Dk), m (B, H)) or None for zeros. Returns h (B, H, T, Dv) in q's dtype and the final state (float32,
    or float64 for float64 inputs). `impl`: "auto" | "recurrent" | "parallel" | "chunkwise" | "triton".
    document_starts: (B, T) bool or None; the state (C, n, m) is zero before each start, so a packed row equals
    separate calls per document (revival/ops/_documents.py). The Triton kernels take them as gate and key values at
    the starts (`resets.py`: exact stabilizer, ~1e-6 relative float32 rounding).
    The Triton kernels' settings (other impls ignore them): `precision`, one of PRECISIONS, for 16-bit inputs ("auto":
    split products and float32 chunk states only when the initial state needs a gradient; docs/kernels.md), and
    `launch`, a `LaunchConfig` overriding block sizes / warps (None: shape-keyed defaults).
    """
    _validate(q, k, v, i, f, time_axis=True)
    _check_chunk_size(chunk_size)
    check_settings(precision, launch)
    B, H, T, Dk = q.shape
    document_starts = check_document_starts(document_starts, B, T, q.device)
    impl = _resolve_impl(impl, q.device, q.dtype, q.shape[-1], v.shape[-1])
    dtype = compute_dtype(q)
    zero_state = state is None
    state = _prepare_state(state, B, H, Dk, v.shape[-1], q, dtype)
    if impl == "triton":
        from .triton import mlstm_triton

        if document_starts is not None:
            k, i, f, state = resets_as_gates(k, i, f, state, document_starts)
        return mlstm_triton(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps, precision=precision, launch=launch)
    args = [x.to(dtype) for x in (q, k, v, i, f)]
    if impl == "recurrent":
        h, state = mlstm_recurrent(*args, state, eps, document_starts)
    elif impl == "parallel":
        h, state = mlstm_parallel(*args, state, eps, document_starts)
    else:
        h, state = _mlstm_chunkwise_opaque(*args, state, chunk_size, eps, zero_state=zero_state,
                                           document_starts=document_starts)
    return h.to(q.dtype), state


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState | None = None,
    *,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One token: q, k: (B, H, Dk); v: (B, H, Dv); i, f: (B, H). Returns h (B, H, Dv) and the new state."""
    _validate(q, k, v, i, f, time_axis=False)
    B, H, Dk = q.shape
    dtype = compute_dtype(q)
    state = _prepare_state(state, B, H, Dk, v.shape[-1], q, dtype)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, i, f, *state))
    if q.is_cuda and not needs_grad and _triton_available():  # the step kernel is forward-only
        from .triton.step import mlstm_step_triton

        return mlstm_step_triton(q, k, v, i, f, state, eps=eps)
    h, state = mlstm_step_reference(*(x.to(dtype) for x in (q, k, v, i, f)), state, eps)
    return h.to(q.dtype), state
