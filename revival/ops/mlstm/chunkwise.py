"""mLSTM chunkwise form: parallel inside chunks of `chunk_size`, sequential over chunk states (docs/math.md).

Linear in T: O(T L (Dk + Dv) + T Dk Dv) per head. This is the pure-PyTorch CPU fast path. A sequence whose length
is not a multiple of the chunk size is handled exactly: the full chunks first (in segments of `SEGMENT_CHUNKS`
chunks), then the tail as one shorter chunk that starts from their state (no padding).

One segment is one `torch.autograd.Function` with a hand-written backward (`_Chunkwise`): autograd through the ~40
small operations of the form would save and revisit far more temporaries, and it cannot skip work that is known to be
zero. Inside, tensors are chunk-major, (NC, B H, L, D): every chunk is one contiguous block, so the sequential
recurrence over chunk states works on contiguous slices, and a zero initial state (`zero_state`, training from
scratch) lets the first chunk's products with the state be skipped. The output h is written in (B, T, H, Dv) memory
order (returned as a (B, H, T, Dv) view), the layout the layers' per-head norms read.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._documents import chunk_masks
from .reference import MLSTMState, max_exponent, normalizer

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
    zero_state: bool = False,
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MLSTMState]:
    """q, k: (B, H, T, Dk); v: (B, H, T, Dv); i, f: (B, H, T); state (C, n, m). Returns h (B, H, T, Dv), state.

    `zero_state=True` promises that `state` is all zeros and needs no gradient (what `mlstm(state=None)` passes): the
    first chunk's products with it are skipped. `document_starts` (B, T) bool: the state is zero before each start."""
    T = q.shape[2]
    segment = SEGMENT_CHUNKS * chunk_size
    full = T // chunk_size * chunk_size
    lengths = [segment] * (full // segment) + [n for n in (full % segment, T - full) if n > 0]  # tail: one short chunk
    if len(lengths) == 1:
        return _equal_chunks(q, k, v, i, f, state, min(chunk_size, T), eps, zero_state, document_starts)
    outputs = []
    starts = [None] * len(lengths) if document_starts is None else document_starts.split(lengths, dim=1)
    # `split` rather than slicing: one backward cat instead of a full-size zero tensor per piece
    for index, pieces in enumerate(zip(*(x.split(lengths, dim=2) for x in (q, k, v, i, f)))):
        length = pieces[0].shape[2]
        h, state = _equal_chunks(*pieces, state, min(chunk_size, length), eps, zero_state and index == 0,
                                 starts[index])
        outputs.append(h)
    return torch.cat(outputs, dim=2), state


def _equal_chunks(q, k, v, i, f, state: MLSTMState, L: int, eps: float, zero_state: bool,
                  document_starts: torch.Tensor | None = None):
    """The chunkwise form for T a multiple of L, in the inputs' dtype (autocast, if on, is not applied inside)."""
    C0, n0, m0 = state
    h, C, n, m = _Chunkwise.apply(q, k, v, i, f, C0, n0, m0, L, eps, zero_state, document_starts)
    return h, (C, n, m)


class _Chunkwise(torch.autograd.Function):
    """The chunkwise form of one segment (T a multiple of L), chunk-major inside. Per (batch, head) and chunk c,
    positions j (queries) and s (keys) of the chunk:

        b = cumsum(log sigmoid f)                 local cumulative log-forget; g = b_L the chunk's total
        a_s = g - b_s + i_s,  a_max = max_s a_s   log weight of input s in the chunk-end state
        C_local = sum_s exp(a_s - a_max) k_s v_s^T,  n_local likewise with k_s
        (C, n, m)_before c                         the sequential recurrence over chunk states (_inter_chunk_*)
        lsw_j = b_j + m_before                     log weight of the state before the chunk, for query j
        m_j = max(lsw_j, b_j + max_{s<=j} (i_s - b_s))                  stabilizer; m'_j = m_j + log(Dk) / 2
        P_js = q_j.k_s exp(b_j - b_s + i_s - m'_j)  for s <= j, else 0
        num_j = exp(lsw_j - m'_j) q_j C_before + sum_s P_js v_s
        den_j = exp(lsw_j - m'_j) q_j.n_before + sum_s P_js
        h_j = num_j / (max(|den_j|, exp(-m_j)) + eps)

    The normalizer n is carried beside C (not as an extra column): the big products keep power-of-two widths, which
    MKL runs markedly faster. The backward is the chain rule of exactly these lines, including the stabilizers (as
    autograd would: `maximum` splits ties in half, `amax` shares among equal maxima, `cummax` routes to its index).

    With document starts, a query j whose document started at r inside the chunk sees the zero state instead:
    lsw_j = b_j - b_{r-1} (m = 0 there) and no q_j C_before term; P, the running max and a_s only span one document
    (a_s = -inf outside the chunk's last document); a chunk with a start drops C_before from its end state, whose
    stabilizer then carries g - b_{r-1} of its last start r instead of g + m_before.
    """

    @staticmethod
    def forward(ctx, q, k, v, i, f, C0, n0, m0, L, eps, zero_state, document_starts):
        with torch.autocast(q.device.type, enabled=False):
            return _Chunkwise._forward(ctx, q, k, v, i, f, C0, n0, m0, L, eps, zero_state, document_starts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h, grad_C, grad_n, grad_m):
        with torch.autocast(ctx.device_type, enabled=False):
            return _Chunkwise._backward(ctx, grad_h, grad_C, grad_n, grad_m)

    @staticmethod
    def _forward(ctx, q, k, v, i, f, C0, n0, m0, L, eps, zero_state, document_starts):
        B, H, T, Dk = q.shape
        ctx.device_type = q.device.type
        Dv = v.shape[-1]
        NC, BH = T // L, B * H
        qc, kc, vc = (_to_chunk_major(x, NC, L) for x in (q, k, v))  # (NC, BH, L, D)
        ic, fc = (_to_chunk_major(x, NC, L) for x in (i, f))  # (NC, BH, L)

        # each chunk's own contribution to the state, stabilized by its own max
        b = torch.cumsum(F.logsigmoid(fc), dim=-1)
        g = b[..., -1].contiguous()  # (NC, BH)
        a = g[..., None] - b + ic
        documents = None
        if document_starts is not None:
            documents = _document_masks(document_starts, b, H, NC, L)
            same, continues, to_end, keeps, last_start, before_start = documents
            a.masked_fill_(~to_end, float("-inf"))
        a_max = a.amax(dim=-1)
        w_k = torch.exp(a - a_max[..., None])
        kw = kc * w_k[..., None]
        C_local = _bmm(kw.transpose(-1, -2), vc)  # (NC, BH, Dk, Dv)
        n_local = kw.sum(dim=-2)  # (NC, BH, Dk)
        restart = None if documents is None else (keeps, g - before_start[..., -1])
        C_before, n_before, m_before, C, n, m, decay, scale, from_previous = _inter_chunk_forward(
            g, a_max, C_local, n_local, C0.reshape(BH, Dk, Dv), n0.reshape(BH, Dk), m0.reshape(BH), restart)

        # intra-chunk: query j sees the state before its chunk and inputs s <= j of its chunk
        lsw = b + m_before[..., None]
        if documents is None:
            # max_{s<=j} (b_j - b_s + i_s) as b_j + cummax(i - b): O(L) instead of an (L, L) max. The stabilizer only
            # has to bound the exponents; its rounding cancels in h (only the eps term sees it).
            running_max, running_argmax = torch.cummax(ic - b, dim=-1)
        else:
            lsw = torch.where(continues, lsw, b - before_start)
            allowed = same & _causal_mask(L, q.device, torch.bool)
            running_max, running_argmax = (ic - b)[..., None, :].masked_fill(~allowed, float("-inf")).max(dim=-1)
        from_state = _half_on_ties(lsw, b + running_max)  # d m / d lsw: 1, 0, or 1/2 on ties (as torch.maximum)
        m_query = torch.maximum(lsw, b + running_max)
        m_scaled = m_query + 0.5 * math.log(Dk)  # exp(x - m_scaled) = Dk**-0.5 exp(x - m_query)
        decay_matrix = b[..., :, None] - b[..., None, :]
        decay_matrix += ic[..., None, :]
        decay_matrix -= m_scaled[..., :, None]
        # entries below the smallest normal number (lost to underflow by the references too) take exp's fast path;
        # entries above the diagonal, masked to 0 after exp, cannot overflow
        tiny = math.log(torch.finfo(decay_matrix.dtype).tiny) + 1.0
        decay_matrix.clamp_(min=tiny, max=20.0).exp_()
        # exact: finite values; ~10x faster than masked_fill_
        decay_matrix.mul_(_causal_mask(L, q.device, q.dtype) if documents is None else allowed)
        scores = _bmm(qc, kc.transpose(-1, -2)).mul_(decay_matrix)  # (NC, BH, L, L)
        w_q = torch.exp(lsw - m_scaled)
        if documents is not None:
            w_q.mul_(continues)  # a document that starts in the chunk reads no state
        qw = qc * w_q[..., None]

        start = 1 if zero_state else 0  # with a zero initial state, chunk 0 has nothing from the state
        numerator = _bmm(scores, vc)  # (NC, BH, L, Dv)
        denominator = scores.sum(dim=-1)  # (NC, BH, L)
        if start < NC:
            _baddbmm_(numerator[start:], qw[start:], C_before[start:])
            # matrix-vector products as vecdot: a bmm with N = 1 is ~2x slower on CPU
            denominator[start:] += torch.linalg.vecdot(qw[start:], n_before[start:, :, None, :])
        norm = normalizer(denominator, m_query, eps)

        h = torch.empty_strided((B, H, T, Dv), (T * H * Dv, Dv, H * Dv, 1), dtype=q.dtype, device=q.device)
        torch.div(numerator.view(NC, B, H, L, Dv), norm.view(NC, B, H, L, 1), out=_chunk_view(h, NC, L))

        ctx.save_for_backward(qc, kc, vc, fc, a, a_max, w_k, kw, C_local, n_local, C_before, n_before, decay, scale,
                              from_previous, running_argmax, from_state, w_q, qw, decay_matrix, scores, denominator,
                              norm, m_query, h, *(() if documents is None else (continues, last_start, keeps)))
        ctx.shape = (B, H, NC, L, Dk, Dv)
        ctx.start = start
        ctx.input_layouts = [(x.shape, x.stride()) for x in (q, k, v, i, f)]
        return h, C.view_as(C0), n.view_as(n0), m.view_as(m0)

    @staticmethod
    def _backward(ctx, grad_h, grad_C, grad_n, grad_m):
        (qc, kc, vc, fc, a, a_max, w_k, kw, C_local, n_local, C_before, n_before, decay, scale, from_previous,
         running_argmax, from_state, w_q, qw, decay_matrix, scores, denominator, norm, m_query, h,
         *documents) = ctx.saved_tensors
        B, H, NC, L, Dk, Dv = ctx.shape
        BH, start = B * H, ctx.start

        # h = num / norm
        if grad_h is None:
            grad_numerator, grad_norm = qc.new_zeros(NC, BH, L, Dv), qc.new_zeros(NC, BH, L)
        else:
            grad_h5, h5 = _chunk_view(grad_h, NC, L), _chunk_view(h, NC, L)
            reciprocal = norm.reciprocal()
            grad_numerator = qc.new_empty(NC, BH, L, Dv)
            torch.mul(grad_h5, reciprocal.view(NC, B, H, L, 1), out=grad_numerator.view(NC, B, H, L, Dv))
            grad_norm = torch.linalg.vecdot(grad_h5, h5).view(NC, BH, L).mul_(reciprocal).neg_()
        # norm = max(|den|, exp(min(-m, cap))) + eps
        cap = max_exponent(m_query.dtype)
        floor = torch.exp(torch.clamp(-m_query, max=cap))
        from_denominator = _half_on_ties(denominator.abs(), floor)
        grad_denominator = grad_norm * from_denominator * torch.sign(denominator)
        grad_m_query = (grad_norm * (from_denominator - 1.0)).mul_(floor).mul_((-m_query <= cap).to(floor.dtype))

        # num = P v + [q_w C_before], den = rowsum(P) + [q_w . n_before]
        grad_scores = _bmm(grad_numerator, vc.transpose(-1, -2)).add_(grad_denominator[..., None])
        grad_v = _bmm(scores.transpose(-1, -2), grad_numerator)
        grad_qw = qc.new_empty(NC, BH, L, Dk)
        grad_C_before, grad_n_before = torch.empty_like(C_before), torch.empty_like(n_before)
        for x in (grad_qw, grad_C_before, grad_n_before):
            x[:start].zero_()  # chunk 0 under a zero initial state: q_w reaches nothing through it
        if start < NC:
            s = slice(start, None)
            _bmm(grad_numerator[s], C_before[s].transpose(-1, -2), out=grad_qw[s])
            grad_qw[s].addcmul_(grad_denominator[s, :, :, None], n_before[s, :, None, :])
            _bmm(qw[s].transpose(-1, -2), grad_numerator[s], out=grad_C_before[s])
            torch.sum(qw[s] * grad_denominator[s, :, :, None], dim=-2, out=grad_n_before[s])

        # P = (q k^T) * D with D = exp(b_j - b_s + i_s - m'_j) on and below the diagonal
        grad_raw = grad_scores * decay_matrix
        grad_log_decay = grad_scores.mul_(scores)  # zero above the diagonal
        rows, cols = grad_log_decay.sum(dim=-1), grad_log_decay.sum(dim=-2)
        grad_b = rows - cols
        grad_i = cols
        grad_m_scaled = rows.neg_()
        grad_q = _bmm(grad_raw, kc)
        grad_k = _bmm(grad_raw.transpose(-1, -2), qc)

        # q_w = q exp(lsw - m'), m' = m + const, m = max(lsw, b + cummax(i - b)), lsw = b + m_before
        grad_q.addcmul_(grad_qw, w_q[..., None])
        grad_log_wq = torch.linalg.vecdot(grad_qw, qw)
        grad_m_query += grad_m_scaled.sub_(grad_log_wq)
        grad_lsw = torch.addcmul(grad_log_wq, grad_m_query, from_state)
        grad_running = grad_m_query.sub_(grad_m_query * from_state)  # d/d(b + cummax(i - b))
        grad_i_minus_b = torch.zeros_like(grad_running).scatter_add_(-1, running_argmax, grad_running)
        grad_b += grad_running
        grad_b += grad_lsw
        grad_b -= grad_i_minus_b
        grad_i += grad_i_minus_b
        if documents:
            continues, last_start, keeps = documents
            grad_m_before = (grad_lsw * continues).sum(dim=-1)
        else:
            grad_m_before = grad_lsw.sum(dim=-1)

        grad_g, grad_a_max, grad_C_local, grad_n_local, grad_C0, grad_n0, grad_m0 = _inter_chunk_backward(
            grad_C_before, grad_n_before, grad_m_before, grad_C, grad_n, grad_m, C_before, n_before, C_local,
            n_local, decay, scale, from_previous, need_initial=start == 0, keeps=documents[2] if documents else None)
        if documents:
            # lsw_j = b_j - b_{r-1} for a document started at r in the chunk, the chunk's carried term g - b_{r-1}:
            # their gradients reach b_{r-1} (b padded by b_{-1} = 0 at index 0)
            grad_before_start = grad_b.new_zeros(NC, BH, L + 1)
            grad_before_start.scatter_add_(-1, last_start, grad_lsw.masked_fill(continues, 0.0).neg_())
            grad_before_start.scatter_add_(-1, last_start[..., -1:], grad_g.masked_fill(keeps, 0.0).neg_()[..., None])
            grad_b += grad_before_start[..., 1:]

        # C_local = kw^T v, n_local = sum_s kw, kw = k exp(a - a_max). Without a gradient of the final state, the
        # last chunk's own contribution (which reaches nothing else) has none either.
        end = NC if grad_C is not None else NC - 1
        grad_kw = grad_n_local[:, :, None, :].expand(NC, BH, L, Dk).contiguous()
        if end > 0:
            e = slice(None, end)
            _baddbmm_(grad_kw[e], vc[e], grad_C_local[e].transpose(-1, -2))
            _baddbmm_(grad_v[e], kw[e], grad_C_local[e])
        grad_k.addcmul_(grad_kw, w_k[..., None])
        grad_a = torch.linalg.vecdot(grad_kw, kw)
        grad_a_max -= grad_a.sum(dim=-1)
        at_max = (a == a_max[..., None]).to(a.dtype)
        grad_a.addcmul_(at_max, (grad_a_max / at_max.sum(dim=-1))[..., None])
        # a = g - b + i, g = b_L, b = cumsum(log sigmoid f)
        grad_g += grad_a.sum(dim=-1)
        grad_b -= grad_a
        grad_i += grad_a
        grad_b[..., -1] += grad_g
        grad_log_f = grad_b.flip(-1).cumsum(-1).flip(-1)
        grad_f = grad_log_f.mul_(torch.sigmoid(-fc))

        # each gradient in its input's memory layout: the views that made the inputs map them back without copies
        grads_inputs = [_from_chunk_major(x, B, H, *layout)
                        for x, layout in zip((grad_q, grad_k, grad_v, grad_i, grad_f), ctx.input_layouts)]
        grads_state = [None if x is None else x.view(shape)
                       for x, shape in zip((grad_C0, grad_n0, grad_m0), ((B, H, Dk, Dv), (B, H, Dk), (B, H)))]
        return (*grads_inputs, *grads_state, None, None, None, None)


def _inter_chunk_forward(g, a_max, C_local, n_local, C0, n0, m0, restart=None):
    """The sequential recurrence over chunk states. g, a_max (NC, BH): the chunks' total log-forget and the max of
    their inputs' log weights; C_local (NC, BH, Dk, Dv), n_local (NC, BH, Dk) each chunk's own stabilized
    contribution; C0 (BH, Dk, Dv), n0 (BH, Dk), m0 (BH) the initial state. Per chunk c, for S in (C, n):

        m_c = max(g_c + m_{c-1}, a_max_c);  S_c = exp(g_c + m_{c-1} - m_c) S_{c-1} + exp(a_max_c - m_c) S_local_c

    `restart` = (keeps, carried_zero) (NC, BH) for document starts: where a chunk does not keep the state before it,
    its zero-state log weight carried_zero replaces g_c + m_{c-1} and S_{c-1} is dropped (decay 0).
    Returns the states before each chunk (C_before, n_before, m_before), the final state (C, n, m), and decay, scale
    and from_previous (NC, BH) for the backward."""
    NC = g.shape[0]
    m_all = g.new_empty(NC + 1, *g.shape[1:])  # m_all[c] is the stabilizer before chunk c
    m_all[0] = m0
    for c in range(NC):
        carried_c = g[c] + m_all[c]
        if restart is not None:
            carried_c = torch.where(restart[0][c], carried_c, restart[1][c])
        torch.maximum(carried_c, a_max[c], out=m_all[c + 1])
    m_before, m_after = m_all[:-1], m_all[1:]
    carried = g + m_before  # log weight of the previous state, before re-stabilizing
    if restart is not None:
        carried = torch.where(restart[0], carried, restart[1])
    decay = torch.exp(carried - m_after)
    scale = torch.exp(a_max - m_after)
    from_previous = _half_on_ties(carried, a_max)
    if restart is not None:
        decay = decay * restart[0]
    states = []
    for local, initial in ((C_local, C0), (n_local, n0)):
        before = torch.empty_like(local)  # before[c] is the state before chunk c
        final = torch.empty_like(initial)
        before[0] = initial
        extra = (None,) * (local.ndim - 2)
        for c in range(NC):
            after = before[c + 1] if c + 1 < NC else final
            torch.mul(before[c], decay[(c, slice(None), *extra)], out=after)
            after.addcmul_(local[c], scale[(c, slice(None), *extra)])
        states.append((before, final))
    (C_before, C), (n_before, n) = states
    return C_before, n_before, m_before, C, n, m_all[-1].clone(), decay, scale, from_previous


def _inter_chunk_backward(grad_C_before, grad_n_before, grad_m_before, grad_C, grad_n, grad_m, C_before, n_before,
                          C_local, n_local, decay, scale, from_previous, need_initial: bool, keeps=None):
    """Reverse loop of `_inter_chunk_forward`. Gradients of the final state may be None (zero). Returns grad_g,
    grad_a_max (NC, BH), grad_C_local, grad_n_local, and the initial state's gradients (None unless need_initial).
    With `keeps` (document starts), grad_g of a chunk that drops the state before it is that of its carried_zero."""
    NC = decay.shape[0]
    grad_log_decay = torch.zeros_like(decay)  # d/d(log decay_c) and d/d(log scale_c), summed over C and n
    grad_log_scale = torch.zeros_like(decay)
    results = []
    for before, local, grad_before, grad_final in (
        (C_before, C_local, grad_C_before, grad_C), (n_before, n_local, grad_n_before, grad_n)
    ):
        BH = before.shape[1]
        before, local, grad_before = before.view(NC, BH, -1), local.view(NC, BH, -1), grad_before.view(NC, BH, -1)
        # gradient of the state after each chunk, in reverse: after c-1 = decay_c * after c + its use as "before c"
        grad_after = torch.empty_like(before)
        if grad_final is None:
            grad_after[-1] = 0.0
        else:
            grad_after[-1] = grad_final.reshape(BH, -1)
        for c in range(NC - 1, 0, -1):
            torch.addcmul(grad_before[c], grad_after[c], decay[c, :, None], out=grad_after[c - 1])
        grad_initial = torch.addcmul(grad_before[0], grad_after[0], decay[0, :, None]) if need_initial else None
        # per chunk the dot products <grad_after_c, before_c> and <grad_after_c, local_c>: the chunks are contiguous
        # blocks, so each is one (BH, 1, X) @ (BH, X, 1) product per chunk
        grad_log_decay += torch.linalg.vecdot(grad_after, before)
        grad_log_scale += torch.linalg.vecdot(grad_after, local)
        results.append((grad_after.mul_(scale[..., None]), grad_initial))  # grad_after is not needed any more
    grad_log_decay *= decay
    grad_log_scale *= scale
    # m_c enters log decay_c and log scale_c with -1, chunk c+1 via carried_{c+1}, and m_before[c+1]
    grad_g = torch.empty_like(decay)
    grad_a_max = torch.empty_like(decay)
    grad_m_after = torch.zeros_like(decay[0]) if grad_m is None else grad_m.reshape(-1)
    for c in range(NC - 1, -1, -1):
        total = grad_m_after - grad_log_decay[c] - grad_log_scale[c]
        grad_g[c] = grad_log_decay[c] + from_previous[c] * total
        grad_a_max[c] = grad_log_scale[c] + (1 - from_previous[c]) * total
        # carried_c = g_c + m_{c-1} (where the chunk keeps the state before it)
        grad_m_after = grad_m_before[c] + (grad_g[c] if keeps is None else grad_g[c] * keeps[c])
    (grad_C_local, grad_C0), (grad_n_local, grad_n0) = results
    return (grad_g, grad_a_max, grad_C_local.view_as(C_local), grad_n_local.view_as(n_local), grad_C0, grad_n0,
            grad_m_after if need_initial else None)


def _document_masks(document_starts: torch.Tensor, b: torch.Tensor, H: int, NC: int, L: int):
    """Chunk-major masks of document_starts (B, T) for b (NC, BH, L): same (NC, BH, L, L), continues, to_end
    (NC, BH, L), keeps (NC, BH) as in `chunk_masks`; last_start (NC, BH, L) the index r of the latest start at or
    before each position (0 where none) and before_start = b_{r-1} (0 for r = 0)."""
    B, T = document_starts.shape
    starts = _to_chunk_major(document_starts[:, None].expand(B, H, T), NC, L)  # (NC, BH, L)
    same, continues, to_end, keeps = chunk_masks(starts)
    steps = torch.arange(L, device=b.device)
    last_start = torch.cummax(torch.where(starts, steps, 0), dim=-1).values
    before_start = F.pad(b, (1, 0)).gather(-1, last_start)
    return same, continues, to_end, keeps, last_start, before_start


def _chunk_view(x: torch.Tensor, NC: int, L: int) -> torch.Tensor:
    """(B, H, NC L, D) -> (NC, B, H, L, D) as a view."""
    return x.unflatten(2, (NC, L)).permute(2, 0, 1, 3, 4)


def _half_on_ties(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d max(x, y) / dx as torch.maximum's backward has it: 1 where x > y, 0 where x < y, 1/2 on ties."""
    return (x > y).to(x.dtype) + 0.5 * (x == y).to(x.dtype)


def _bmm(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Batched matmul over the two leading dims (NC, BH) of chunk-major tensors (views merge them; no copies).
    `out`, when given, is a contiguous block that receives the product."""
    if out is not None:
        torch.bmm(x.flatten(0, 1), y.flatten(0, 1), out=out.flatten(0, 1))
        return out
    result = torch.bmm(x.flatten(0, 1), y.flatten(0, 1))
    return result.view(*x.shape[:2], *result.shape[1:])


def _baddbmm_(target: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """target += x @ y in place, over the two leading dims of contiguous chunk-major blocks."""
    target.flatten(0, 1).baddbmm_(x.flatten(0, 1), y.flatten(0, 1))


def _is_feature_major(x: torch.Tensor) -> bool:
    """A (B, H, T, D) transposed view of (B, H, D, T) memory (what the mLSTM layer hands over)."""
    return x.stride(-2) == 1 and x.stride(-1) != 1


def _to_chunk_major(x: torch.Tensor, NC: int, L: int) -> torch.Tensor:
    """(B, H, NC L, ...) -> (NC, B H, L, ...), one copy: q, k, v (a feature dim) or the gates (none). Feature-major
    input is copied into (NC, B H, D, L) memory in L-float runs and returned as its transposed view: the products
    take either orientation, and no element-wise transpose is needed."""
    B, H = x.shape[:2]
    chunks = x.unflatten(2, (NC, L))  # (B, H, NC, L, ...), a view whatever the strides
    if x.ndim == 4 and _is_feature_major(x):
        memory = chunks.permute(2, 0, 1, 4, 3).contiguous()  # (NC, B, H, D, L)
        return memory.view(NC, B * H, x.shape[-1], L).transpose(-1, -2)
    return chunks.permute(2, 0, 1, *range(3, x.ndim + 1)).contiguous().flatten(1, 2)


def _from_chunk_major(x: torch.Tensor, B: int, H: int, shape: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `_to_chunk_major` (one copy): (NC, B H, L, ...) -> (B, H, NC L, ...),
    stored with the given strides when they describe a dense layout (else contiguous)."""
    NC, _, L = x.shape[:3]
    out = x.new_empty_strided(shape, stride) if _is_dense(shape, stride) else x.new_empty(shape)
    dims = (2, 0, 1, 3, 4)[: out.ndim + 1]
    out.unflatten(2, (NC, L)).permute(*dims).copy_(x.view(NC, B, H, *x.shape[2:]))
    return out


def _is_dense(shape, stride) -> bool:
    """Whether the strides lay the shape out without gaps or overlaps (a permutation of a contiguous layout)."""
    expected = 1
    for size, step in sorted(zip(shape, stride), key=lambda pair: pair[1]):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


@functools.lru_cache(maxsize=64)
def _causal_mask(L: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L, L) in `dtype`: 1 on and below the diagonal (inputs up to the query), 0 above."""
    return torch.ones(L, L, dtype=dtype, device=device).tril()
