"""Chunkwise gated delta rule forward in Triton (WY form; the algorithm in `revival.ops.delta_rule`'s module doc).

Three kernels:
1. `_wy_kernel`, every (chunk, batch*head) in parallel: the chunk's (I + M)^-1 (M strictly lower triangular, by
   blocked forward substitution, `unit_triangular_inverse`), then
   W = (I + M)^-1 diag(beta exp(gamma)) K and U0 = (I + M)^-1 diag(beta) V; for the backward it keeps the inverse
   and strict decay * K K^T (16 KB each per chunk and head at L = 64, instead of forming them again there).
2. `_states_kernel`, one program per (Dv-tile, batch*head) walking the chunks in order: stores the state entering
   each chunk, U = U0 - W S for each chunk, and the final state.
3. `_output_kernel`, every (chunk, batch*head, Dv-tile) in parallel:
   O = diag(exp(gamma)) Q S + (causal decay * Q K^T) U.

A transposed operand of a matrix product is always loaded transposed from memory, never `tl.trans` of a computed
tile (the pattern behind wrong gradients on Hopper in fla #640). Positions past T load as zeros with g = beta = 0:
they change nothing (no padding of the inputs). Packed documents (optional (n, T) int8 starts): per chunk the masks
of chunkwise.py (`document_masks`): M and the scores within one document, the entering state read only by the
document running before the chunk, the end state fed only by the chunk's last document. Layout: q, k (n, T, H, Dk),
v and the buffers W, U0, U (n, T, H, D) contiguous; g, beta (n, T, H) float32; states (n*H, NC, Dk, Dv) float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Not specialised on: the sequence length and chunk count (Triton compiles an integer argument apart when it is 1,
# divisible by 16 or neither: up to 9 variants of a kernel across lengths); head dims and tiles are.
LENGTHS = ("T", "NC")


@triton.jit
def chunk_tokens(row, c, T, H, L: tl.constexpr):
    """Token indices into (n, T, H) of chunk c of batch*head `row` (= b * H + h), and which are < T."""
    t = c * L + tl.arange(0, L)
    b = row // H
    return (b * T + t).to(tl.int64) * H + row % H, t < T


@triton.jit
def load_rows(ptr, tokens, valid, D, BD: tl.constexpr, start):
    """(L, BD) float32 tile of a (..., D) tensor: columns start.. of the rows `tokens`, zeros past T and D."""
    offs = start + tl.arange(0, BD)
    mask = valid[:, None] & (offs < D)[None, :]
    return tl.load(ptr + tokens[:, None] * D + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_cols(ptr, tokens, valid, D, BD: tl.constexpr, start):
    """The same tile transposed, (BD, L), read transposed from memory."""
    offs = start + tl.arange(0, BD)
    mask = (offs < D)[:, None] & valid[None, :]
    return tl.load(ptr + tokens[None, :] * D + offs[:, None], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_decay(g_ptr, tokens, valid):
    """gamma (cumulative log decay in the chunk) and its total; g = 0 past T."""
    g = tl.load(g_ptr + tokens, mask=valid, other=0.0)
    return tl.cumsum(g, 0), tl.sum(g, 0)


@triton.jit
def load_gates(g_ptr, beta_ptr, tokens, valid):
    """load_decay's gamma and total, and beta (0 past T)."""
    gamma, g_total = load_decay(g_ptr, tokens, valid)
    return gamma, g_total, tl.load(beta_ptr + tokens, mask=valid, other=0.0)


@triton.jit
def value_tile(tokens, valid, iv, DV, BV: tl.constexpr):
    """Offsets and mask of the Dv-tile iv (BV columns) of the rows `tokens` of a (n, T, H, Dv) tensor."""
    offs_v = iv * BV + tl.arange(0, BV)
    return tokens[:, None] * DV + offs_v[None, :], valid[:, None] & (offs_v < DV)[None, :]


@triton.jit
def document_masks(starts_ptr, b, c, T, L: tl.constexpr, HAS_STARTS: tl.constexpr):
    """Masks of chunk c of batch row b from its document starts (n, T) int8 (revival/ops/_documents.py chunk_masks):
    same (L, L) (tokens t, s in one document), from_state (L,) (1.0: the token is in the document running before the
    chunk), to_end (L,) (1.0: in the chunk's last document), keeps (1.0: no start in the chunk). Without starts: one
    document, all ones."""
    offs = tl.arange(0, L)
    if HAS_STARTS:
        t = c * L + offs
        starts = tl.load(starts_ptr + b.to(tl.int64) * T + t, mask=t < T, other=0).to(tl.int32)
        ids = tl.cumsum(starts, 0)
        last = tl.max(ids, 0)
        same = ids[:, None] == ids[None, :]
        from_state = tl.where(ids == 0, 1.0, 0.0)
        to_end = tl.where(ids == last, 1.0, 0.0)
        keeps = tl.where(last == 0, 1.0, 0.0)
    else:
        same = offs[:, None] >= 0
        from_state = tl.full((L,), 1.0, tl.float32)
        to_end = tl.full((L,), 1.0, tl.float32)
        keeps = 1.0
    return same, from_state, to_end, keeps


@triton.jit
def decay_matrix(gamma, same, STRICT: tl.constexpr, L: tl.constexpr):
    """exp(gamma_t - gamma_s) for s < t (STRICT) or s <= t within one document (`same`), else 0; (L_t, L_s)."""
    offs = tl.arange(0, L)
    keep = offs[:, None] > offs[None, :] if STRICT else offs[:, None] >= offs[None, :]
    return tl.exp(tl.where(keep & same, gamma[:, None] - gamma[None, :], float("-inf")))


@triton.jit
def unit_triangular_inverse(M, L: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr):
    """(I + M)^-1 for M strictly lower triangular (L, L), by forward substitution in (BLOCK, BLOCK) blocks.
    1. The diagonal blocks' inverses D, all blocks at once, one column per step (BLOCK - 1 steps): row j of a block's
       inverse is final once its columns < j are eliminated, then every row i > j of the block takes -M[i, j] times
       it (float32 on CUDA cores).
    2. Block rows in order: T <- D - D M_o T (M_o the blocks below the diagonal) makes block row r final at the r-th
       pass (it reads only final rows above it): L / BLOCK - 1 passes of two products on the matrix units.
    BLOCK = L is plain forward substitution. Not the product of (I + (-M)^(2^i)): exact in exact arithmetic, but for
    correlated keys (a repeated token) the powers of M grow like binomial coefficients and cancel to garbage
    (tests/ops/test_delta_rule_triton_stability.py)."""
    offs = tl.arange(0, L)
    same_block = (offs[:, None] // BLOCK) == (offs[None, :] // BLOCK)
    inverse = tl.where(offs[:, None] == offs[None, :], 1.0, 0.0)
    diagonal = tl.where(same_block, M, 0.0)
    for j in range(0, BLOCK - 1):
        at_j = (offs % BLOCK) == j  # column j of every block
        column = tl.sum(tl.where(at_j[None, :], diagonal, 0.0), 1)  # M[i, block(i) + j]
        row = tl.sum(tl.where(at_j[:, None] & same_block, inverse, 0.0), 0)  # inverse[block(s) + j, s], final
        inverse -= tl.where(same_block, column[:, None] * row[None, :], 0.0)
    if BLOCK < L:
        below = tl.where(same_block, 0.0, M)
        blocks = inverse
        for _ in range(0, L // BLOCK - 1):
            inverse = blocks - tl.dot(blocks, tl.dot(below, inverse, input_precision=PRECISION),
                                      input_precision=PRECISION)
    return inverse


@triton.jit
def state_offsets(row, c, NC, DK, DV, BK: tl.constexpr, BV: tl.constexpr, iv):
    """Offsets and mask of the (BK, BV) Dv-tile iv of the state entering chunk c, in a (n*H, NC, Dk, Dv) buffer."""
    offs_k = tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    offs = (row.to(tl.int64) * NC + c) * DK * DV + offs_k[:, None] * DV + offs_v[None, :]
    return offs, (offs_k < DK)[:, None] & (offs_v < DV)[None, :]


@triton.jit
def load_state(ptr, row, c, NC, DK, DV, BK: tl.constexpr, BV: tl.constexpr, iv):
    """The (BK, BV) Dv-tile iv of the state entering chunk c (zeros past Dk, Dv) from a (n*H, NC, Dk, Dv) buffer."""
    offs, mask = state_offsets(row, c, NC, DK, DV, BK, BV, iv)
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def store_state(ptr, S, row, c, NC, DK, DV, BK: tl.constexpr, BV: tl.constexpr, iv):
    """Stores S as that tile."""
    offs, mask = state_offsets(row, c, NC, DK, DV, BK, BV, iv)
    tl.store(ptr + offs, S, mask=mask)


@triton.jit(do_not_specialize=LENGTHS)
def _wy_kernel(
    k_ptr, v_ptr, g_ptr, beta_ptr, starts_ptr, w_ptr, u0_ptr, inverse_ptr,
    T, H, NC, DK, DV,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    SAVE_INVERSE: tl.constexpr, INVERSE_BLOCK: tl.constexpr,
):
    """SAVE_INVERSE: T = (I + M)^-1 and A = strict decay * K K^T (M = diag(beta) A) into a (n*H, NC, 2, L, L)
    buffer for the backward (which read T, T^T transposed from memory, and A instead of forming them again)."""
    c = tl.program_id(0)
    row = tl.program_id(1)
    tokens, valid = chunk_tokens(row, c, T, H, L)
    same, from_state, _, _ = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    gamma, _, beta = load_gates(g_ptr, beta_ptr, tokens, valid)
    k = load_rows(k_ptr, tokens, valid, DK, BK, 0)
    kk = tl.dot(k, load_cols(k_ptr, tokens, valid, DK, BK, 0), input_precision=PRECISION)
    a = decay_matrix(gamma, same, True, L) * kk
    inverse = unit_triangular_inverse(beta[:, None] * a, L, INVERSE_BLOCK, PRECISION)
    if SAVE_INVERSE:
        offs = tl.arange(0, L)
        here = inverse_ptr + (row.to(tl.int64) * NC + c) * 2 * L * L + offs[:, None] * L + offs[None, :]
        tl.store(here, inverse)
        tl.store(here + L * L, a)
    w = tl.dot(inverse, k * (beta * tl.exp(gamma) * from_state)[:, None], input_precision=PRECISION)
    offs_k = tl.arange(0, BK)
    tl.store(w_ptr + tokens[:, None] * DK + offs_k[None, :], w, mask=valid[:, None] & (offs_k < DK)[None, :])
    for start in range(0, DV, BV):  # U0 one Dv-tile at a time
        v = load_rows(v_ptr, tokens, valid, DV, BV, start)
        u0 = tl.dot(inverse, v * beta[:, None], input_precision=PRECISION)
        offs_v = start + tl.arange(0, BV)
        tl.store(u0_ptr + tokens[:, None] * DV + offs_v[None, :], u0, mask=valid[:, None] & (offs_v < DV)[None, :])


@triton.jit
def initial_state(ptr, index, DK, WIDTH, BK: tl.constexpr, BV: tl.constexpr, iv, INIT: tl.constexpr):
    """The (BK, BV) tile iv of a walk's starting state: zeros, the identity (a transition's product) or loaded from
    `index` of a (.., Dk, WIDTH) buffer."""
    if INIT == "load":
        S = load_state(ptr, index, 0, 1, DK, WIDTH, BK, BV, iv)
    elif INIT == "identity":
        offs_k = tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        S = tl.where((offs_k[:, None] == offs_v[None, :]) & (offs_k < DK)[:, None], 1.0, 0.0)
    else:
        S = tl.zeros((BK, BV), tl.float32)
    return S


@triton.jit(do_not_specialize=LENGTHS + ("SPAN",))
def _states_kernel(
    k_ptr, w_ptr, u0_ptr, g_ptr, starts_ptr, s_first_ptr,
    states_ptr, u_ptr, s_last_ptr,
    T, H, NC, SPAN, DK, DV, WIDTH,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
    WALK: tl.constexpr, FIRST_SEGMENT: tl.constexpr,
):
    """One (column tile, batch*head, segment) walking the segment's SPAN chunks in order, S <- A_c S + K~^T U0 with
    A_c = exp(gamma_L) I - K~^T W (K~ the keys scaled to the chunk's end). WALK "full": from the segment's entering
    state (`s_first_ptr` at segment*rows + row), storing each chunk's entering state and U = U0 - W S, and the final
    state once the last segment is done; "local": from zero, only the segment's end state (to `s_last_ptr` at
    segment*rows + row); "transition": from the identity without inputs (WIDTH = Dk columns), the segment's product
    of A_c. Segments start at FIRST_SEGMENT + program_id(2) (forward.py's `segmented_walk`)."""
    iv = tl.program_id(0)
    row = tl.program_id(1)
    segment = FIRST_SEGMENT + tl.program_id(2)
    index = segment * tl.num_programs(1) + row
    S = initial_state(s_first_ptr, index, DK, WIDTH, BK, BV, iv,
                      "load" if WALK == "full" else ("identity" if WALK == "transition" else "zeros"))
    for c in range(segment * SPAN, tl.minimum(NC, segment * SPAN + SPAN)):
        if WALK == "full":
            store_state(states_ptr, S, row, c, NC, DK, DV, BK, BV, iv)
        tokens, valid = chunk_tokens(row, c, T, H, L)
        gamma, g_total = load_decay(g_ptr, tokens, valid)
        w = load_rows(w_ptr, tokens, valid, DK, BK, 0)
        if WALK == "transition":
            u = -tl.dot(w, S, input_precision=PRECISION)
        else:
            u_offs, mask_u = value_tile(tokens, valid, iv, DV, BV)
            u = tl.load(u0_ptr + u_offs, mask=mask_u, other=0.0) - tl.dot(w, S, input_precision=PRECISION)
            if WALK == "full":
                tl.store(u_ptr + u_offs, u, mask=mask_u)
        _, _, to_end, keeps = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
        k_to_end = load_cols(k_ptr, tokens, valid, DK, BK, 0) * (tl.exp(g_total - gamma) * to_end)[None, :]
        S = tl.exp(g_total) * keeps * S + tl.dot(k_to_end, u, input_precision=PRECISION)
    if WALK == "full":
        if segment == tl.num_programs(2) - 1:
            store_state(s_last_ptr, S, row, 0, 1, DK, DV, BK, BV, iv)
    else:
        store_state(s_last_ptr, S, index, 0, 1, DK, WIDTH, BK, BV, iv)


@triton.jit(do_not_specialize=LENGTHS)
def _output_kernel(
    q_ptr, k_ptr, g_ptr, starts_ptr, states_ptr, u_ptr, o_ptr,
    T, H, NC, DK, DV, scale,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, HAS_STARTS: tl.constexpr,
):
    c = tl.program_id(0)
    row = tl.program_id(1)
    iv = tl.program_id(2)
    tokens, valid = chunk_tokens(row, c, T, H, L)
    gamma, _ = load_decay(g_ptr, tokens, valid)
    q = load_rows(q_ptr, tokens, valid, DK, BK, 0) * scale
    scores = tl.dot(q, load_cols(k_ptr, tokens, valid, DK, BK, 0), input_precision=PRECISION)
    same, from_state, _, _ = document_masks(starts_ptr, row // H, c, T, L, HAS_STARTS)
    scores *= decay_matrix(gamma, same, False, L)
    S = load_state(states_ptr, row, c, NC, DK, DV, BK, BV, iv)
    u_offs, mask_u = value_tile(tokens, valid, iv, DV, BV)
    u = tl.load(u_ptr + u_offs, mask=mask_u, other=0.0)
    o = tl.dot(q * (tl.exp(gamma) * from_state)[:, None], S, input_precision=PRECISION)
    o += tl.dot(scores, u, input_precision=PRECISION)
    tl.store(o_ptr + u_offs, o.to(o_ptr.dtype.element_ty), mask=mask_u)


# Kernel specialisations that fit the chip's shared memory only without software pipelining: a cache of what the
# hardware allows (one failed compile each), never set by callers.
_UNPIPELINED: set = set()


def launch(kernel, grid: tuple, *args, **options) -> None:
    """kernel[grid](*args, **options); when it does not fit the chip's shared memory (pipelining keeps several
    chunks' tiles in flight), once more with num_stages=1."""
    from triton.runtime.errors import OutOfResources

    key = (id(kernel), tuple(sorted(options.items())))
    if key not in _UNPIPELINED:
        try:
            kernel[grid](*args, **options)
            return
        except OutOfResources:
            _UNPIPELINED.add(key)
    kernel[grid](*args, **{**options, "num_stages": 1})


def product_precision(dtype: torch.dtype) -> str:
    """The products' input_precision: 16-bit inputs on tf32 matrix units, float32 inputs in three-pass tf32
    (float32-level accuracy). Not "ieee": CUDA-core products of (64, 64) tiles spill ~100 KB per thread and compile
    for minutes on sm_90 (docs/kernels.md)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(x - 1, 0).bit_length())


def sizes(q, v, L: int) -> tuple[int, ...]:
    """(n, T, H, Dk, Dv) of q (n, T, H, Dk) and v (n, T, H, Dv), the number of chunks NC and the tile widths BK, BV."""
    n, T, H, Dk = q.shape
    Dv = v.shape[-1]
    return n, T, H, Dk, Dv, triton.cdiv(T, L), pow2(Dk), pow2(Dv)


def delta_rule_forward(q, k, v, g, beta, S0, starts, scale: float, L: int, cfg, *, for_backward: bool = True):
    """q, k (n, T, H, Dk), v (n, T, H, Dv) contiguous, one dtype; g, beta (n, T, H) float32; S0 (n*H, Dk, Dv)
    float32; starts (n, T) int8 document starts or None; L a power of two; cfg a complete LaunchConfig. Returns
    o (like v), the final state (n*H, Dk, Dv) and what the backward reads: W, U (n, T, H, D) float32, the chunk
    states (n*H, NC, Dk, Dv), each chunk's T and A (n*H, NC, 2, L, L) float32 (`_wy_kernel`; None unless
    `for_backward`) and the walk's segment transitions (`segmented_walk`; None for one segment)."""
    n, T, H, Dk, Dv, NC, BK, BV = sizes(q, v, L)
    precision = product_precision(q.dtype)
    f32 = dict(device=q.device, dtype=torch.float32)
    w, u0, u = torch.empty(n, T, H, Dk, **f32), torch.empty(n, T, H, Dv, **f32), torch.empty(n, T, H, Dv, **f32)
    states = torch.empty(n * H, NC, Dk, Dv, **f32)
    S_T = torch.empty(n * H, Dk, Dv, **f32)
    o = torch.empty_like(v)
    documents = dict(HAS_STARTS=starts is not None)
    starts = g if starts is None else starts  # any tensor when HAS_STARTS is off: never read
    inverse = torch.empty(n * H, NC, 2, L, L, **f32) if for_backward else None
    launch(_wy_kernel, (NC, n * H), k, v, g, beta, starts, w, u0, w if inverse is None else inverse, T, H, NC, Dk,
           Dv, L=L, BK=BK, BV=min(cfg.block_v_wy, BV), PRECISION=precision, num_warps=cfg.warps_wy,
           SAVE_INVERSE=for_backward, INVERSE_BLOCK=min(cfg.inverse_block, L), **documents)
    walk = dict(L=L, BK=BK, BV=min(cfg.block_v_states, BV), PRECISION=precision, num_warps=cfg.warps_states,
                **documents)
    transitions = segmented_walk(_states_kernel, (k, w, u0, g, starts), S0, (states, u), S_T, (T, H, NC), (Dk, Dv),
                                 n * H, cfg.segments, walk)
    block_v = min(cfg.block_v_output, BV)
    launch(_output_kernel, (NC, n * H, triton.cdiv(Dv, block_v)),
        q, k, g, starts, states, u, o, T, H, NC, Dk, Dv, scale, L=L, BK=BK, BV=block_v, PRECISION=precision,
        num_warps=cfg.warps_output, **documents)
    return o, S_T, (w, u, states, inverse, transitions)


def segments_of(chunks: int, segments: int) -> tuple[int, int]:
    """(number of segments, chunks per segment) when `chunks` chunks are split into at most `segments` segments."""
    span = triton.cdiv(chunks, max(1, min(segments, chunks)))
    return triton.cdiv(chunks, span), span


def segmented_walk(kernel, inputs, first, outputs, last, lengths, dims, rows: int, segments: int, walk: dict, *,
                   transitions: torch.Tensor | None = None, reverse: bool = False) -> torch.Tensor | None:
    """A sequential walk over the chunks (`_states_kernel`, or backward.py's `_dstates_kernel` with `reverse`) in
    segments walked at once: each segment's map from its entering to its leaving value is affine, X -> P X + E, so
    1. every segment but the one the walk starts in walks from zero ("local": E), in parallel;
    2. the segments' entering values follow in order, X_next = P X + E (float32 batched products, one per segment);
    3. every segment walks again from its entering value ("full"), storing what one walk would.
    P, the product of the segment's A_c (Dk x Dk), comes from a walk from the identity without inputs
    ("transition") in the forward, for every segment; the backward's maps are their transposes (the A_c^T in
    reverse order), so it takes the forward's `transitions` instead of walking again. About 2.5 walks of work
    forwards and 2 backwards (Dv = 2 Dk) in exchange for `segments` times the programs: it pays when batch*heads
    alone leave SMs idle (long contexts at small batch), not otherwise (config.py's `default_segments`). `first` is
    the walk's starting value (rows, Dk, Dv), `last` receives its final value; 1 segment is the plain walk.
    Returns the forward's transitions (segments, rows, Dk, Dk) float32, None for one segment."""
    Dk, Dv = dims
    NC = lengths[-1]
    NS, span = segments_of(NC, segments)
    BV = walk["BV"]
    tiles = triton.cdiv(Dv, BV)
    if NS == 1:
        launch(kernel, (tiles, rows, 1), *inputs, first, *outputs, last, *lengths, span, Dk, Dv, Dv, WALK="full",
               FIRST_SEGMENT=0, **walk)
        return None
    f32 = dict(device=first.device, dtype=torch.float32)
    ends = torch.empty(NS, rows, Dk, Dv, **f32)
    # forwards the last segment's own end is not needed, backwards the first's
    launch(kernel, (tiles, rows, NS - 1), *inputs, first, *outputs, ends, *lengths, span, Dk, Dv, Dv,
           WALK="local", FIRST_SEGMENT=1 if reverse else 0, **walk)
    if not reverse:
        transitions = torch.empty(NS, rows, Dk, Dk, **f32)
        launch(kernel, (triton.cdiv(Dk, BV), rows, NS), *inputs, first, *outputs, transitions, *lengths, span,
               Dk, Dv, Dk, WALK="transition", FIRST_SEGMENT=0, **walk)
    entering = torch.empty(NS, rows, Dk, Dv, **f32)
    order = range(NS - 1, 0, -1) if reverse else range(NS - 1)
    entering[order[0]] = first
    for segment in order:
        after = segment - 1 if reverse else segment + 1
        transition = transitions[segment].mT if reverse else transitions[segment]
        torch.baddbmm(ends[segment], transition, entering[segment], out=entering[after])
    launch(kernel, (tiles, rows, NS), *inputs, entering, *outputs, last, *lengths, span, Dk, Dv, Dv, WALK="full",
           FIRST_SEGMENT=0, **walk)
    return transitions
