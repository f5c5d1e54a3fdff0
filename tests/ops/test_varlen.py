"""Packed rows with `document_starts` == separate calls, for every op (float64): outputs, the final state of every
document, gradients of the inputs, shared weights and the initial state.

`check_packed` is the harness (the layer and model tests use it too). Layouts: T = 27 with chunk size 8, so documents
start on chunk edges (8, 16, 24) and inside chunks, 1-token documents, a document spanning several chunks, the tail
chunk of 3.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.ops import gated_delta_rule, mingru_scan, minlstm_scan, mlstm, slstm, ssd
from revival.ops._documents import from_attention_mask, from_lengths, key_starts
from revival.ops.attention import causal_attention
from revival.ops.delta_rule import gated_delta_rule_reference
from revival.ops.ssd import ssd_reference

LAYOUTS = [[1, 7, 8, 1, 7, 3], [5, 1, 1, 9, 8, 3], [3, 24]]
T = 27
CHUNK = 8
DTYPE = torch.float64


def random_layouts(rows: int, length: int, seed: int) -> list[list[int]]:
    """Random document lengths per row (many 1-token documents), each row summing to `length`."""
    generator = torch.Generator().manual_seed(seed)
    layouts = []
    for _ in range(rows):
        row, left = [], length
        while left:
            n = min(left, 1 if torch.rand(1, generator=generator) < 0.3 else int(torch.randint(1, 12, (1,),
                                                                                               generator=generator)))
            row.append(n)
            left -= n
        layouts.append(row)
    return layouts


def documents(layouts):
    """(row, start, stop, is_last) for every document."""
    for row, lengths in enumerate(layouts):
        start = 0
        for index, n in enumerate(lengths):
            yield row, start, start + n, index == len(lengths) - 1
            start += n


def _assert_close(actual, expected, atol, what: str):
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None


def _leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _as_tuple(state):
    """The tensors of a (nested tuple/list) state, flattened."""
    if state is None:
        return ()
    if isinstance(state, (tuple, list)):
        return tuple(t for part in state for t in _as_tuple(part))
    return (state,)


def check_packed(run, time_inputs, time_dims, shared_inputs, out_time_dim, layouts=LAYOUTS, initial_state=None,
                 atol=1e-10, grads=True, parameters=(), states=True, cut_states=True):
    """run(time_inputs, shared_inputs, state, document_starts) -> (out, final_state) on a packed batch equals `run`
    on each document alone (state None, or the row's `initial_state` for its first document, whose start is then
    dropped): outputs, final states (the last document's from the full row, every document's from the row cut at
    its end) and, with `grads`, the gradients of every floating input (time, shared and the initial state) and of
    `parameters` (a module's, which `run` uses). `states=False` skips the state comparisons (a KV cache holds every
    document's keys, so it is not a separate call's); `cut_states=False` skips the rows cut at every document end."""
    starts = from_lengths(layouts)
    if initial_state is not None:
        starts[:, 0] = False
    state_list = list(_as_tuple(initial_state))
    packed_leaves = _leaves(time_inputs), _leaves(shared_inputs), _leaves(state_list)
    separate_leaves = _leaves(time_inputs), _leaves(shared_inputs), _leaves(state_list)

    def state_arg(states):
        if initial_state is None:
            return None
        return states if isinstance(initial_state, (tuple, list)) else states[0]

    out, final = run(*packed_leaves[:2], state_arg(packed_leaves[2]), starts)
    final = _as_tuple(final)
    generator = torch.Generator().manual_seed(0)
    out_weight = torch.randn(out.shape, generator=generator, dtype=out.dtype)
    state_weights = [torch.randn(s.shape, generator=generator, dtype=s.dtype) if s.is_floating_point() else None
                     for s in final]
    loss = (out * out_weight).sum()
    if states:
        loss = loss + sum((s * w).sum() for s, w in zip(final, state_weights) if s.is_floating_point())

    separate_loss = 0.0
    sep_time, sep_shared, sep_state = separate_leaves
    for row, start, stop, is_last in documents(layouts):
        pieces = [x.narrow(0, row, 1).narrow(dim, start, stop - start) for x, dim in zip(sep_time, time_dims)]
        first = start == 0 and initial_state is not None
        state = state_arg([s.narrow(0, row, 1) for s in sep_state]) if first else None
        doc_out, doc_final = run(pieces, sep_shared, state, None)
        doc_final = _as_tuple(doc_final)
        expected = out.narrow(0, row, 1).narrow(out_time_dim, start, stop - start)
        _assert_close(expected, doc_out, atol, f"output {row, start}")
        separate_loss = separate_loss + (doc_out * out_weight.narrow(0, row, 1).narrow(
            out_time_dim, start, stop - start)).sum()
        if is_last and states:
            for index, (packed_state, doc_state, weight) in enumerate(zip(final, doc_final, state_weights)):
                _assert_close(packed_state.narrow(0, row, 1), doc_state, atol, f"final state[{index}] of row {row}")
                if doc_state.is_floating_point():
                    separate_loss = separate_loss + (doc_state * weight.narrow(0, row, 1)).sum()
        if not (states and cut_states):
            continue
        with torch.no_grad():  # the state at this document's end, from the packed row cut there
            cut = [x.narrow(0, row, 1).narrow(dim, 0, stop) for x, dim in zip(time_inputs, time_dims)]
            cut_state = state_arg([s.narrow(0, row, 1) for s in state_list]) if initial_state is not None else None
            _, cut_final = run(cut, shared_inputs, cut_state, starts[row : row + 1, :stop])
            for index, (cut_s, doc_s) in enumerate(zip(_as_tuple(cut_final), doc_final)):
                _assert_close(cut_s, doc_s.detach(), atol, f"state[{index}] at the end of {row, start, stop}")
    if not grads:
        return
    parameters = list(parameters)
    for p in parameters:
        p.grad = None
    loss.backward()
    packed_parameter_grads = [p.grad.clone() for p in parameters]
    for p in parameters:
        p.grad = None
    separate_loss.backward()
    for index, (p, packed_grad) in enumerate(zip(parameters, packed_parameter_grads)):
        _assert_close(packed_grad, p.grad, atol, f"gradient of parameter {index} {tuple(p.shape)}")
    for group, (packed_group, separate_group) in enumerate(zip(packed_leaves, separate_leaves)):
        for index, (p, s) in enumerate(zip(packed_group, separate_group)):
            if p is None or not p.requires_grad or p.numel() == 0:
                continue
            assert p.grad is not None and s.grad is not None, f"no gradient for input {group, index}"
            _assert_close(p.grad, s.grad, atol, f"gradient of input {group, index}")


def check_no_starts_is_unchanged(run, time_inputs, shared_inputs, state=None):
    """All-False document_starts give exactly the result without them."""
    B, length = time_inputs[0].shape[0], T
    plain_out, plain_final = run(time_inputs, shared_inputs, state, None)
    out, final = run(time_inputs, shared_inputs, state, torch.zeros(B, length, dtype=torch.bool))
    torch.testing.assert_close(out, plain_out, atol=1e-12, rtol=0)
    for a, b in zip(_as_tuple(final), _as_tuple(plain_final)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# ---------------------------------------------------------------------------------------------------------- helpers
def test_from_attention_mask_and_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    starts = from_attention_mask(mask)
    assert starts.tolist() == [[False, False, True, False, False], [False] * 5, [False, False, False, True, False]]
    first_keys = key_starts(starts, 5, 9, cache_start=torch.tensor([0, 2, 1]))  # 4 cached keys before the queries
    assert first_keys.tolist() == [[0, 0, 6, 6, 6], [2, 2, 2, 2, 2], [1, 1, 1, 7, 7]]
    with pytest.raises(ValueError, match="attention_mask"):
        from_attention_mask(torch.tensor([[0, 2]]))


# ---------------------------------------------------------------------------------------------------------- mLSTM
def _mlstm_inputs(B=3, H=2, Dk=4, Dv=5, seed=0):
    q, k = _randn(B, H, T, Dk, seed=seed), _randn(B, H, T, Dk, seed=seed + 1)
    v = _randn(B, H, T, Dv, seed=seed + 2)
    i, f = _randn(B, H, T, seed=seed + 3), 2.0 + _randn(B, H, T, seed=seed + 4)
    return [q, k, v, i, f]


def _mlstm_state(B=3, H=2, Dk=4, Dv=5):
    return (_randn(B, H, Dk, Dv, seed=7), _randn(B, H, Dk, seed=8).abs(), _randn(B, H, seed=9))


def _mlstm_run(impl):
    def run(time_inputs, shared, state, starts):
        return mlstm(*time_inputs, state, impl=impl, chunk_size=CHUNK, document_starts=starts)
    return run


@pytest.mark.parametrize("impl", ["recurrent", "parallel", "chunkwise"])
def test_mlstm_packed_equals_separate(impl):
    check_packed(_mlstm_run(impl), _mlstm_inputs(), [2] * 5, [], 2)


@pytest.mark.parametrize("impl", ["recurrent", "parallel", "chunkwise"])
def test_mlstm_packed_with_initial_state(impl):
    check_packed(_mlstm_run(impl), _mlstm_inputs(), [2] * 5, [], 2, initial_state=_mlstm_state())


def test_mlstm_chunkwise_random_layouts_long():
    """Several segments of chunks (T > 16 chunks) and random layouts."""
    length = 8 * 20 + 5
    layouts = random_layouts(2, length, seed=3)
    B, H, Dk, Dv = 2, 1, 4, 4
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(B, H, length, d, generator=g, dtype=DTYPE) for d in (Dk, Dk, Dv)]
    inputs += [torch.randn(B, H, length, generator=g, dtype=DTYPE), 3 + torch.randn(B, H, length, generator=g,
                                                                                    dtype=DTYPE)]
    check_packed(_mlstm_run("chunkwise"), inputs, [2] * 5, [], 2, layouts=layouts)


@pytest.mark.parametrize("impl", ["recurrent", "parallel", "chunkwise"])
def test_mlstm_no_starts_is_unchanged(impl):
    check_no_starts_is_unchanged(_mlstm_run(impl), _mlstm_inputs(), [], _mlstm_state())


# ---------------------------------------------------------------------------------------------------------- sLSTM
def _slstm_run(impl):
    def run(time_inputs, shared, state, starts):
        return slstm(time_inputs[0], shared[0], state, impl=impl, document_starts=starts)
    return run


def _slstm_inputs(B=3, H=2, d=3):
    return [_randn(B, T, 4, H, d, seed=11)], [0.5 * _randn(4, H, d, d, seed=12)]


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_slstm_packed_equals_separate(impl):
    time_inputs, shared = _slstm_inputs()
    check_packed(_slstm_run(impl), time_inputs, [1], shared, 1)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_slstm_packed_with_initial_state(impl):
    time_inputs, shared = _slstm_inputs()
    B, H, d = 3, 2, 3
    state = (_randn(B, H, d, seed=1), _randn(B, H, d, seed=2).abs() + 0.5, _randn(B, H, d, seed=3),
             _randn(B, H, d, seed=4))
    check_packed(_slstm_run(impl), time_inputs, [1], shared, 1, initial_state=state)


# ------------------------------------------------------------------------------------------------- minGRU / minLSTM
@pytest.mark.parametrize("impl", ["log", "chunked", "reference"])
def test_mingru_packed_equals_separate(impl):
    def run(time_inputs, shared, state, starts):
        return mingru_scan(*time_inputs, state, impl=impl, chunk_size=CHUNK, document_starts=starts)
    inputs = [_randn(3, T, 5, seed=21), _randn(3, T, 5, seed=22)]
    check_packed(run, inputs, [1, 1], [], 1)
    check_packed(run, inputs, [1, 1], [], 1, initial_state=_randn(3, 5, seed=23))


@pytest.mark.parametrize("impl", ["log", "chunked", "reference"])
def test_minlstm_packed_equals_separate(impl):
    def run(time_inputs, shared, state, starts):
        return minlstm_scan(*time_inputs, state, impl=impl, chunk_size=CHUNK, document_starts=starts)
    inputs = [_randn(3, T, 5, seed=24), _randn(3, T, 5, seed=25), _randn(3, T, 5, seed=26)]
    check_packed(run, inputs, [1, 1, 1], [], 1)
    check_packed(run, inputs, [1, 1, 1], [], 1, initial_state=_randn(3, 5, seed=27))


# ---------------------------------------------------------------------------------------------------------- SSD
def _ssd_inputs(n=3, H=4, P=3, G=2, N=5):
    x, dt = _randn(n, T, H, P, seed=31), F.softplus(_randn(n, T, H, seed=32))
    B, C = _randn(n, T, G, N, seed=33), _randn(n, T, G, N, seed=34)
    A, D = -torch.exp(_randn(H, seed=35)), _randn(H, seed=36)
    return [x, dt, B, C], [A, D], _randn(n, H, P, N, seed=37)


@pytest.mark.parametrize("op", ["chunked", "reference"])
def test_ssd_packed_equals_separate(op):
    def run(time_inputs, shared, state, starts):
        x, dt, B, C = time_inputs
        A, D = shared
        if op == "reference":
            return ssd_reference(x, dt, A, B, C, D, state, document_starts=starts)
        return ssd(x, dt, A, B, C, D, state, chunk_size=CHUNK, document_starts=starts)
    time_inputs, shared, state = _ssd_inputs()
    check_packed(run, time_inputs, [1] * 4, shared, 1)
    check_packed(run, time_inputs, [1] * 4, shared, 1, initial_state=state)


# ------------------------------------------------------------------------------------------------- gated delta rule
@pytest.mark.parametrize("op", ["chunked", "reference"])
def test_gated_delta_rule_packed_equals_separate(op):
    def run(time_inputs, shared, state, starts):
        q, k, v, g, beta = time_inputs
        if op == "reference":
            return gated_delta_rule_reference(q, k, v, g, beta, state, document_starts=starts)
        return gated_delta_rule(q, k, v, g, beta, state, chunk_size=CHUNK, document_starts=starts)
    n, H, Dk, Dv = 3, 2, 4, 3
    q, k = F.normalize(_randn(n, T, H, Dk, seed=41), dim=-1), F.normalize(_randn(n, T, H, Dk, seed=42), dim=-1)
    v, g = _randn(n, T, H, Dv, seed=43), -F.softplus(_randn(n, T, H, seed=44))
    beta = torch.sigmoid(_randn(n, T, H, seed=45))
    check_packed(run, [q, k, v, g, beta], [1] * 5, [], 1)
    check_packed(run, [q, k, v, g, beta], [1] * 5, [], 1, initial_state=_randn(n, H, Dk, Dv, seed=46))


# ---------------------------------------------------------------------------------------------------------- attention
def test_causal_attention_packed_equals_separate():
    def run(time_inputs, shared, state, starts):
        return causal_attention(*time_inputs, document_starts=starts), None
    B, Hq, Hkv, hd = 3, 4, 2, 8
    q, k, v = _randn(B, Hq, T, hd, seed=51), _randn(B, Hkv, T, hd, seed=52), _randn(B, Hkv, T, hd, seed=53)
    check_packed(run, [q, k, v], [2, 2, 2], [], 2)


def test_document_bounds_cut_every_start_and_row():
    from revival.ops.attention.varlen import document_bounds

    starts = from_lengths([[2, 3], [5]])
    starts[1, 0] = False  # a row without a start at t = 0 still begins a document in the flattened tokens
    cu_seqlens, longest = document_bounds(starts)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 10] and longest == 5


def test_causal_attention_varlen_path_equals_sdpa_mask():
    """The varlen path (rows flattened, cut at the starts, grouped-query heads) with the kernel's float64 stand-in
    `varlen_attention_reference` equals the SDPA block-diagonal mask: outputs and gradients; on CUDA the flash
    kernel itself is compared in test_causal_attention_varlen_kernel_on_cuda."""
    from revival.ops.attention.varlen import varlen_attention_reference

    _check_varlen_path_equals_mask(varlen_attention_reference, seed=61)


def _check_varlen_path_equals_mask(kernel, seed: int) -> None:
    """`document_attention_varlen` with `kernel` (grouped-query heads, LAYOUTS' packed rows) equals the SDPA
    block-diagonal mask in float64: outputs and the gradients of q, k and v."""
    from revival.ops.attention.varlen import document_attention_varlen

    B, Hq, Hkv, hd = 3, 4, 2, 8
    inputs = [_randn(B, Hq, T, hd, seed=seed), _randn(B, Hkv, T, hd, seed=seed + 1),
              _randn(B, Hkv, T, hd, seed=seed + 2)]
    starts = from_lengths(LAYOUTS)
    weight = _randn(B, Hq, T, hd, seed=seed + 3)
    results = []
    for fn in (lambda q, k, v: causal_attention(q, k, v, document_starts=starts, impl="sdpa"),
               lambda q, k, v: document_attention_varlen(q, k, v, starts, kernel=kernel)):
        leaves = _leaves(inputs)
        out = fn(*leaves)
        (out * weight).sum().backward()
        results.append([out.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        _assert_close(a, b, 1e-12, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs CUDA")
def test_causal_attention_varlen_kernel_on_cuda():
    """auto takes the flash varlen kernel for bfloat16 packed rows on CUDA; it agrees with the SDPA mask (both
    bfloat16, float32 accumulation) in outputs and gradients."""
    B, Hq, Hkv, hd, length = 2, 4, 2, 64, 300
    layouts = random_layouts(B, length, seed=65)
    starts = from_lengths(layouts, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(66)
    inputs = [torch.randn(B, h, length, hd, device="cuda", generator=g, dtype=torch.bfloat16)
              for h in (Hq, Hkv, Hkv)]
    weight = torch.randn(B, Hq, length, hd, device="cuda", generator=g, dtype=torch.bfloat16)
    results = []
    for impl in ("sdpa", "varlen", "auto"):
        leaves = _leaves(inputs)
        out = causal_attention(*leaves, document_starts=starts, impl=impl)
        (out.float() * weight.float()).sum().backward()
        results.append([out.detach().float()] + [x.grad.float() for x in leaves])
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), *results):
        # auto is the varlen kernel (its backward accumulates dq with atomics: equal up to the summation order)
        assert torch.equal(b, c) if name == "out" else ((b - c).norm() / b.norm()).item() < 1e-3, name
        error = ((a - b).norm() / a.norm()).item()
        assert error < 2e-2, (name, error)


def test_causal_attention_impl_validation():
    q = _randn(1, 2, 4, 8, seed=67)
    starts = from_lengths([[2, 2]])
    with pytest.raises(ValueError, match="impl: expected one of"):
        causal_attention(q, q, q, document_starts=starts, impl="flash")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="impl: 'varlen' needs CUDA"):
            causal_attention(q, q, q, document_starts=starts, impl="varlen")
    with pytest.raises(ValueError, match="for packed rows"):
        causal_attention(q, q, q, impl="varlen")
    torch.testing.assert_close(causal_attention(q, q, q, document_starts=starts),
                               causal_attention(q, q, q, document_starts=starts, impl="sdpa"), atol=0, rtol=0)


@pytest.mark.parametrize("signature", ["window_size_without_enable_gqa", "is_causal_only"])
def test_varlen_path_adapts_to_older_kernel_signatures(signature):
    """torch 2.11's varlen_attn has no enable_gqa (seen on the H200 image) and 2.9's takes is_causal instead of
    window_size: the varlen path expands the kv heads and passes what the kernel takes; results equal the mask."""
    from revival.ops.attention.varlen import varlen_attention_reference

    calls = []
    if signature == "window_size_without_enable_gqa":
        def old_kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1)):
            calls.append(k.shape[1])
            return varlen_attention_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size)
    else:
        def old_kernel(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
            assert is_causal
            calls.append(k.shape[1])
            return varlen_attention_reference(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k)

    _check_varlen_path_equals_mask(old_kernel, seed=71)
    assert calls == [4]  # the kernel saw the kv heads expanded to the 4 query heads
