"""mLSTM chunkwise form: parallel inside chunks of `chunk_size`, sequential over chunk states (MATH.md).

Linear in T: O(T L (Dk + Dv) + T Dk Dv) per head. This is the pure-PyTorch CPU fast path. A sequence whose length
is not a multiple of the chunk size is handled exactly: the full chunks first (in segments of `SEGMENT_CHUNKS`
chunks), then the tail as one shorter chunk that starts from their state (no padding).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .reference import MLSTMState, normalizer

# Long sequences run as segments of at most this many chunks, the state carried from one to the next (exact): the
# working set stays cache-sized, so the cost per token does not grow with T.
SEGMENT_CHUNKS = 16


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    state: MLSTMState,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); i, f: (B, H, T); state (C, n, m). Returns h (B, H, T, Dv), state."""
    T = q.shape[2]
    segment = SEGMENT_CHUNKS * chunk_size
    full = T // chunk_size * chunk_size
    lengths = [segment] * (full // segment) + [n for n in (full % segment, T - full) if n > 0]  # tail: one short chunk
    outputs = []
    # `split` rather than slicing: one backward cat instead of a full-size zero tensor per piece
    for pieces in zip(*(x.split(lengths, dim=2) for x in (q, k, v, i, f))):
        h, state = _equal_chunks(*pieces, state, min(chunk_size, pieces[0].shape[2]), eps)
        outputs.append(h)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)), state


def _equal_chunks(q, k, v, i, f, state: MLSTMState, L: int, eps: float) -> tuple[torch.Tensor, MLSTMState]:
    """The chunkwise form for T a multiple of L.

    The normalizer n is carried beside C (not as an extra column of C): the big matmuls keep power-of-two widths
    (Dk, Dv), which MKL runs markedly faster than Dv + 1, and h needs no strided slice. n's own terms are a weighted
    sum over keys and one matrix-vector product per chunk.
    """
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    NC = T // L
    q = _chunked(q, NC, L)  # the scale Dk**-0.5 on q is applied through the weights below
    k = _chunked(k, NC, L)
    v = _chunked(v, NC, L)
    i = i.reshape(B, H, NC, L)
    b = torch.cumsum(F.logsigmoid(f).reshape(B, H, NC, L), dim=-1)  # local cumulative log-forget
    g = b[..., -1]  # total log-forget of each chunk, (B, H, NC)
    a = g[..., None] - b + i  # log weight of input j in the chunk-end state, (B, H, NC, L)

    # Each chunk's own contribution to the state, stabilized by its own max.
    a_max = a.amax(dim=-1)  # (B, H, NC)
    k_weighted = k * torch.exp(a - a_max[..., None])[..., None]
    C_local = k_weighted.transpose(-1, -2) @ v  # (B, H, NC, Dk, Dv)
    n_local = k_weighted.sum(dim=-2)  # (B, H, NC, Dk)

    C0, n0, m0 = state
    C_before, n_before, m_before, C, n, m = _InterChunk.apply(g, a_max, C_local, n_local, C0, n0, m0)

    # Intra-chunk (parallel): query j sees the state before its chunk and inputs s <= j of its chunk.
    log_state_weight = b + m_before[..., None]  # (B, H, NC, L)
    # max_{s<=j} (b_j - b_s + i_s) as b_j + cummax(i - b): O(L) instead of a (L, L) max. The stabilizer only has to
    # bound the exponents; its rounding cancels in h (only the eps term sees it).
    m_query = torch.maximum(log_state_weight, b + torch.cummax(i - b, dim=-1).values)
    m_scaled = m_query + 0.5 * math.log(Dk)  # exp(x - m_scaled) = Dk**-0.5 * exp(x - m_query)
    scores = _CausalDecayedScores.apply(q @ k.transpose(-1, -2), b, i, m_scaled)  # (B, H, NC, L, L)
    q_weighted = q * torch.exp(log_state_weight - m_scaled)[..., None]
    numerator = torch.baddbmm((q_weighted @ C_before).flatten(0, 2), scores.flatten(0, 2), v.flatten(0, 2))
    denominator = (q_weighted @ n_before[..., None]).squeeze(-1) + scores.sum(dim=-1)  # (B, H, NC, L)
    h = numerator.view(B, H, NC, L, Dv) * normalizer(denominator, m_query, eps).reciprocal()[..., None]
    return h.view(B, H, T, Dv), (C, n, m)


def _chunked(x: torch.Tensor, NC: int, L: int) -> torch.Tensor:
    """(B, H, NC L, D) -> (B, H, NC, L, D). A transposed view of feature-major (B, H, D, T) data (what the mLSTM layer
    hands over) is copied chunk-major, (B, H, NC, D, L) in L-float runs, and returned as its transposed view: the
    matmuls below take either orientation, and no element-wise transpose is needed."""
    B, H, _, D = x.shape
    if x.stride(-2) == 1 and x.stride(-1) != 1:
        return x.transpose(-1, -2).reshape(B, H, D, NC, L).transpose(2, 3).contiguous().transpose(-1, -2)
    return x.reshape(B, H, NC, L, D)


class _CausalDecayedScores(torch.autograd.Function):
    """scores[j, s] = S[j, s] * exp(b_j - b_s + i_s - m_j) for s <= j, else 0.

    S: (..., L, L) raw scores q.k; b, i, m: (..., L). A hand-written backward keeps the (L, L) work to two
    elementwise products and two reductions (autograd would save and revisit five (L, L) temporaries).
    Log weights are clamped to [log(tiny), 20] before exp: entries below the dtype's smallest normal number
    (which the references also lose to underflow) take exp's fast path, and entries above the diagonal, masked to
    0 after exp, cannot overflow.
    """

    @staticmethod
    def forward(ctx, S, b, i, m):
        L = S.shape[-1]
        decay = b[..., :, None] - b[..., None, :]
        decay += i[..., None, :]
        decay -= m[..., :, None]
        decay.clamp_(min=math.log(torch.finfo(decay.dtype).tiny) + 1.0, max=20.0).exp_()
        decay.mul_(_causal_mask(L, S.device, S.dtype))  # exact: decay is finite; ~10x faster than masked_fill_
        scores = S * decay
        ctx.save_for_backward(decay, scores)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        decay, scores = ctx.saved_tensors
        grad_S = grad_scores * decay
        grad_log = grad_scores * scores  # d/d(log weight[j, s]); zero above the diagonal
        rows = grad_log.sum(-1)  # sum over s: through b_j and m_j
        cols = grad_log.sum(-2)  # sum over j: through -b_s and i_s
        return grad_S, rows - cols, cols, -rows


class _InterChunk(torch.autograd.Function):
    """The sequential recurrence over chunk states, with a hand-written backward (reverse loop).

    Inputs: g, a_max (B, H, NC) the chunks' total log-forget and the max of their inputs' log weights;
    C_local (B, H, NC, Dk, Dv), n_local (B, H, NC, Dk) each chunk's own stabilized contribution; C0 (B, H, Dk, Dv),
    n0 (B, H, Dk), m0 (B, H) the initial state. Per chunk c, for S in (C, n):

        m_c = max(g_c + m_{c-1}, a_max_c);  S_c = exp(g_c + m_{c-1} - m_c) S_{c-1} + exp(a_max_c - m_c) S_local_c

    Returns the states before each chunk, C_before (B, H, NC, Dk, Dv), n_before (B, H, NC, Dk), m_before
    (B, H, NC), and the final state (C, n, m). Autograd through a Python loop costs ~25 small autograd nodes per
    chunk; this costs ~3 in-place ops per state part.
    """

    @staticmethod
    def forward(ctx, g, a_max, C_local, n_local, C0, n0, m0):
        B, H, NC = g.shape
        m_all = g.new_empty(B, H, NC + 1)  # m_all[:, :, c] is the stabilizer before chunk c
        m_all[..., 0] = m0
        for c in range(NC):
            torch.maximum(g[..., c] + m_all[..., c], a_max[..., c], out=m_all[..., c + 1])
        m_before, m_after = m_all[..., :-1], m_all[..., 1:]
        carried = g + m_before  # log weight of the previous state, before re-stabilizing
        decay = torch.exp(carried - m_after)
        scale = torch.exp(a_max - m_after)
        # 1 where the previous state set the max, 0 where the chunk did, 1/2 on ties (as torch.maximum's gradient)
        from_previous = (carried > a_max).to(g.dtype) + 0.5 * (carried == a_max).to(g.dtype)

        outputs = []
        for local, initial in ((C_local, C0), (n_local, n0)):
            # one scalar per (b, h, c): view the state part as (B, H, NC, X)
            local_flat = local.flatten(3)
            before = torch.empty_like(local_flat)  # before[:, :, c] is the state before chunk c
            final = torch.empty_like(initial.flatten(2))
            before[:, :, 0] = initial.flatten(2)
            for c in range(NC):
                after = before[:, :, c + 1] if c + 1 < NC else final
                torch.mul(before[:, :, c], decay[..., c, None], out=after)
                after.addcmul_(local_flat[:, :, c], scale[..., c, None])
            outputs.append((before.view_as(local), final.view_as(initial)))
        (C_before, C_final), (n_before, n_final) = outputs
        ctx.save_for_backward(C_before, n_before, C_local, n_local, decay, scale, from_previous)
        return C_before, n_before, m_before.clone(), C_final, n_final, m_all[..., -1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_C_before, grad_n_before, grad_m_before, grad_C, grad_n, grad_m):
        C_before, n_before, C_local, n_local, decay, scale, from_previous = ctx.saved_tensors
        B, H, NC = decay.shape
        grad_log_decay = torch.zeros_like(decay)  # d/d(log decay_c) and d/d(log scale_c), summed over C and n
        grad_log_scale = torch.zeros_like(decay)
        grads = []
        for before, local, grad_before, grad_final in (
            (C_before, C_local, grad_C_before, grad_C), (n_before, n_local, grad_n_before, grad_n)
        ):
            before, local, grad_before = before.flatten(3), local.flatten(3), grad_before.flatten(3)
            # Gradient w.r.t. the state after each chunk, in reverse: after c-1 = decay_c * after c + (its use as
            # "before c" in the intra-chunk part).
            grad_after = torch.empty_like(before)
            grad_after[:, :, -1] = grad_final.flatten(2)
            for c in range(NC - 1, 0, -1):
                after_c, decay_c = grad_after[:, :, c], decay[..., c, None]
                torch.addcmul(grad_before[:, :, c], after_c, decay_c, out=grad_after[:, :, c - 1])
            grad_initial = torch.addcmul(grad_before[:, :, 0], grad_after[:, :, 0], decay[..., 0, None])
            # vecdot, not einsum: einsum lowers these dot products to a bmm with M = N = 1, ~4x slower
            grad_log_decay += torch.linalg.vecdot(grad_after, before)
            grad_log_scale += torch.linalg.vecdot(grad_after, local)
            grad_local = grad_after.mul_(scale[..., None])  # grad_after is not needed any more
            grads.append((grad_local, grad_initial))
        grad_log_decay *= decay
        grad_log_scale *= scale
        # m_c enters log decay_c and log scale_c with -1, chunk c+1 via carried_{c+1}, and m_before[c+1].
        grad_g = torch.empty_like(decay)
        grad_a_max = torch.empty_like(decay)
        grad_m_after = grad_m
        for c in range(NC - 1, -1, -1):
            total = grad_m_after - grad_log_decay[..., c] - grad_log_scale[..., c]
            grad_g[..., c] = grad_log_decay[..., c] + from_previous[..., c] * total
            grad_a_max[..., c] = grad_log_scale[..., c] + (1 - from_previous[..., c]) * total
            grad_m_after = grad_g[..., c] + grad_m_before[..., c]  # carried_c = g_c + m_{c-1}
        (grad_C_local, grad_C0), (grad_n_local, grad_n0) = grads
        return (grad_g, grad_a_max, grad_C_local.view_as(C_local), grad_n_local.view_as(n_local),
                grad_C0.view_as(grad_C), grad_n0.view_as(grad_n), grad_m_after)


@functools.lru_cache(maxsize=64)
def _causal_mask(L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L, L) in `dtype`: 1 on and below the diagonal (inputs up to the query), 0 above."""
    return torch.ones(L, L, dtype=dtype, device=device).tril()
