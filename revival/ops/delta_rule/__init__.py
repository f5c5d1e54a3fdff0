"""The gated delta rule of Gated DeltaNet (arXiv 2412.06464; MATH.md "Gated DeltaNet").

Convention of this module. The state is stored key-major, S: (Dk, Dv) per head (MATH.md writes its transpose,
Dv x Dk). With a_t = exp(g_t), q scaled by `scale` (default Dk**-0.5, as the paper's code does):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        (= MATH.md's a_t S (I - beta k k^T) + beta v k^T,
    o_t = S_t^T (scale * q_t)                                             transposed)

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
from .._documents import check_document_starts, chunk_masks
from ..linear_scan.chunkwise import compute_dtype


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
    """The recurrence one step at a time, in the input dtype. Shapes and convention as in the module doc."""
    n, T, H, Dk, Dv = _validate(q, k, v, g, beta, state)
    document_starts = check_document_starts(document_starts, n, T, q.device)
    scale = Dk**-0.5 if scale is None else scale
    S = q.new_zeros(n, H, Dk, Dv) if state is None else state.to(q.dtype)
    outputs = []
    for t in range(T):
        if document_starts is not None:
            S = torch.where(document_starts[:, t, None, None, None], 0.0, S)
        S = torch.exp(g[:, t])[..., None, None] * S
        kt, vt = k[:, t], v[:, t]  # (n, H, Dk), (n, H, Dv)
        u = beta[:, t, :, None] * (vt - torch.einsum("nhkv,nhk->nhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        outputs.append(torch.einsum("nhkv,nhk->nhv", S, q[:, t] * scale))
    return torch.stack(outputs, dim=1), S


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state: torch.Tensor | None = None, *, scale: float | None = None, chunk_size: int = 64,
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated delta rule, chunkwise (WY). Returns (o (n, T, H, Dv), state (n, H, Dk, Dv)); see the module doc."""
    n, T, H, Dk, Dv = _validate(q, k, v, g, beta, state)
    document_starts = check_document_starts(document_starts, n, T, q.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size}")
    scale = Dk**-0.5 if scale is None else scale
    dtype = compute_dtype(q)
    # Internal layout: heads before time.
    qs, ks, vs = (t.to(dtype).transpose(1, 2) for t in (q * scale, k, v))  # (n, H, T, D)
    gs, betas = g.to(dtype).transpose(1, 2), beta.to(dtype).transpose(1, 2)  # (n, H, T)
    S = q.new_zeros(n, H, Dk, Dv, dtype=dtype) if state is None else state.to(dtype)
    full = (T // chunk_size) * chunk_size
    outputs = []
    for start, stop, L in ((0, full, chunk_size), (full, T, T - full)):
        if stop > start:
            starts = None if document_starts is None else document_starts[:, start:stop]
            o, S = _equal_chunks(qs[:, :, start:stop], ks[:, :, start:stop], vs[:, :, start:stop],
                                 gs[:, :, start:stop], betas[:, :, start:stop], S, L, starts)
            outputs.append(o)
    o = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return o.transpose(1, 2).to(q.dtype), S


def _equal_chunks(q, k, v, g, beta, S, L: int, document_starts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise form for T a multiple of L. q (already scaled), k: (n, H, T, Dk); v: (n, H, T, Dv)."""
    n, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = T // L
    q, k, v = q.reshape(n, H, NC, L, Dk), k.reshape(n, H, NC, L, Dk), v.reshape(n, H, NC, L, Dv)
    beta = beta.reshape(n, H, NC, L)
    gamma = torch.cumsum(g.reshape(n, H, NC, L), dim=-1)  # cumulative log decay inside each chunk

    log_decay = gamma[..., :, None] - gamma[..., None, :]  # (n, H, NC, L_t, L_s)
    ones = torch.ones(L, L, dtype=torch.bool, device=q.device)
    strict, causal = ones.tril(-1), ones.tril()
    if document_starts is not None:
        same, continues, to_end, keeps = (m[:, None] for m in chunk_masks(document_starts.reshape(n, NC, L)))
        strict, causal = strict & same, causal & same
    minus_inf = torch.full_like(log_decay, float("-inf"))
    decay_strict = torch.exp(torch.where(strict, log_decay, minus_inf))  # s < t
    decay_causal = torch.exp(torch.where(causal, log_decay, minus_inf))  # s <= t

    # WY: one unit lower triangular solve per chunk for both right-hand sides.
    M = beta[..., :, None] * decay_strict * (k @ k.transpose(-1, -2))  # strictly lower triangular
    I_plus_M = torch.eye(L, dtype=q.dtype, device=q.device) + M
    from_start = torch.exp(gamma)  # how S_0 reaches each position
    if document_starts is not None:
        from_start = from_start * continues  # a document that starts in the chunk never sees S_0
    rhs = torch.cat([(beta * from_start)[..., None] * k, beta[..., None] * v], dim=-1)  # (n, H, NC, L, Dk+Dv)
    solved = torch.linalg.solve_triangular(I_plus_M, rhs, upper=False, unitriangular=True)
    W, U0 = solved[..., :Dk], solved[..., Dk:]  # (n, H, NC, L, Dk), (n, H, NC, L, Dv)

    scores = decay_causal * (q @ k.transpose(-1, -2))  # (n, H, NC, L, L)
    q_from_start = q * from_start[..., None]
    k_to_end = k * torch.exp(gamma[..., -1:] - gamma)[..., None]
    chunk_decay = torch.exp(gamma[..., -1])  # (n, H, NC)
    if document_starts is not None:  # only the chunk's last document reaches its end state
        k_to_end = k_to_end * to_end[..., None]
        chunk_decay = chunk_decay * keeps

    outputs = []
    for c in range(NC):
        U = U0[:, :, c] - W[:, :, c] @ S  # (n, H, L, Dv)
        outputs.append(q_from_start[:, :, c] @ S + scores[:, :, c] @ U)
        S = chunk_decay[:, :, c, None, None] * S + k_to_end[:, :, c].transpose(-1, -2) @ U
    return torch.stack(outputs, dim=2).reshape(n, H, T, Dv), S
