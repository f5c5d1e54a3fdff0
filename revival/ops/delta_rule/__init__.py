"""The gated delta rule of Gated DeltaNet (arXiv 2412.06464; docs/math.md "Gated DeltaNet").

Convention of this module. The state is stored key-major, S: (Dk, Dv) per head (docs/math.md writes its transpose,
Dv x Dk). With a_t = exp(g_t), q scaled by `scale` (default Dk**-0.5, as the paper's code does):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        (= docs/math.md's a_t S (I - beta k k^T)
    o_t = S_t^T (scale * q_t)                                              + beta v k^T, transposed)

Shapes (batch n, time T, heads H): q, k (n, T, H, Dk); v (n, T, H, Dv); g (n, T, H) log decay (<= 0; a = exp(g));
beta (n, T, H) the write strength itself (e.g. a sigmoid, not a pre-activation); state (n, H, Dk, Dv) or None
(zeros)  ->  o (n, T, H, Dv), state (n, H, Dk, Dv). The op does not normalize k; the layer L2-normalizes q and k
(with unnormalized k the recurrence can blow up, as the delta rule itself does).

Chunkwise form (WY representation). Write the update as S_t = a_t S_{t-1} + k_t u_t^T with
u_t = beta_t (v_t - a_t S_{t-1}^T k_t). Inside a chunk starting from S_0, with gamma_t = cumulative log decay:

    S_t = exp(gamma_t) S_0 + sum_{s <= t} exp(gamma_t - gamma_s) k_s u_s^T
    (I + M) U = diag(beta) V - diag(beta exp(gamma)) K S_0,   M[t, s] = beta_t exp(gamma_t - gamma_s) k_t.k_s (s < t)

so U = U0 - W S_0 with U0 = (I + M)^-1 diag(beta) V and W = (I + M)^-1 diag(beta exp(gamma)) K: one unit lower
triangular solve per chunk, all chunks at once. Then, per chunk in sequence:

    O = diag(exp(gamma)) Q S_0 + (tril(exp(gamma_t - gamma_s)) * Q K^T) U
    S_L = exp(gamma_L) S_0 + (exp(gamma_L - gamma) * K)^T U

Only exponentials of gamma_t - gamma_s with t >= s appear (<= 1 when g <= 0). Lengths that are not a multiple of
the chunk size are handled exactly (tail chunk, no padding). Computation is float32 for half/bfloat16 inputs (float64
stays float64); o follows the input dtype, the state is float32 (float64).

`document_starts` (n, T) bool or None: S is zero before each start, so a packed row equals separate calls per document
(revival/ops/_documents.py); chunkwise, M and the scores span one document, S_0 reaches only the tokens of the
document running when the chunk begins, and a chunk with a start passes on only its last document's state.
"""

from __future__ import annotations

import torch

from .._checks import check_floating, check_shape
from .._documents import check_document_starts, drop_state_at_first_start
from .chunkwise import gated_delta_rule_chunkwise
from .reference import gated_delta_rule_recurrent

__all__ = ["IMPLS", "gated_delta_rule", "gated_delta_rule_reference"]

IMPLS = ("auto", "chunkwise", "triton")
_TRITON_MAX_HEAD_DIM = 256  # the Triton kernels hold a chunk's (L, Dk) tiles whole


def _resolve_impl(impl, q, Dv: int) -> str:
    """"auto": the Triton kernels (`triton/`) on CUDA for 16/32-bit inputs and head dims up to 256, else
    "chunkwise"."""
    from .._triton import resolve_impl

    return resolve_impl(impl, q, max(q.shape[-1], Dv) <= _TRITON_MAX_HEAD_DIM, IMPLS)


def _validate(q, k, v, g, beta, state) -> tuple[int, int, int, int, int]:
    check_floating("q", q)
    if q.ndim != 4 or q.shape[1] == 0:
        raise ValueError(f"q: expected shape (batch, T, H, Dk) with T >= 1, got {tuple(q.shape)}")
    n, T, H, Dk = q.shape
    check_shape("k", k, (n, T, H, Dk))
    check_shape("v", v, (n, T, H, None))
    check_shape("g", g, (n, T, H))
    check_shape("beta", beta, (n, T, H))
    Dv = v.shape[-1]
    if state is not None:
        check_shape("state", state, (n, H, Dk, Dv))
    return n, T, H, Dk, Dv


def gated_delta_rule_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, *, scale: float | None = None, document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time, in the input dtype (`reference.py`). Shapes and convention as in the
    module doc."""
    n, T, H, Dk, Dv = _validate(q, k, v, g, beta, state)
    document_starts = check_document_starts(document_starts, n, T, q.device)
    scale = Dk**-0.5 if scale is None else scale
    return gated_delta_rule_recurrent(q, k, v, g, beta, state, scale, document_starts)


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, *, scale: float | None = None, chunk_size: int = 64,
    document_starts: torch.Tensor | None = None, impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule, chunkwise (WY). Returns (o (n, T, H, Dv), state (n, H, Dk, Dv)); see the module doc.
    `impl`: "chunkwise" (PyTorch, `chunkwise.py`), "triton" (the kernels of `triton/`; one token without gradients
    takes the decode step kernel) or "auto" (triton where it runs, see `_resolve_impl`)."""
    n, T, H, Dk, Dv = _validate(q, k, v, g, beta, state)
    document_starts = check_document_starts(document_starts, n, T, q.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size}")
    scale = Dk**-0.5 if scale is None else scale
    if _resolve_impl(impl, q, Dv) == "triton":
        from .triton import gated_delta_rule_step_triton, gated_delta_rule_triton

        tensors = (q, k, v, g, beta) + (() if state is None else (state,))
        if T == 1 and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            state = drop_state_at_first_start(state, document_starts)
            o, state = gated_delta_rule_step_triton(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, scale)
            return o[:, None], state
        return gated_delta_rule_triton(q, k, v, g, beta, state, scale, chunk_size=chunk_size,
                                       document_starts=document_starts)
    return gated_delta_rule_chunkwise(q, k, v, g, beta, state, scale, chunk_size, document_starts)
