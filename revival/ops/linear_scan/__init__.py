"""minGRU / minLSTM ("Were RNNs All We Needed?", arXiv 2410.01201): the log-space parallel scan and its siblings.

Both cells are the diagonal linear recurrence h_t = a_t * h_{t-1} + b_t with gates computed from pre-activations
(docs/math.md, "minGRU / minLSTM"):

    minGRU:  z = sigmoid(gate), htilde = g(hidden),  h_t = (1 - z) h_{t-1} + z htilde
    minLSTM: f = sigmoid(forget), i = sigmoid(input), f' = f / (f + i), i' = i / (f + i),
             h_t = f' h_{t-1} + i' htilde,  htilde = g(hidden)

with g(x) = x + 0.5 for x >= 0 and sigmoid(x) otherwise (keeps htilde > 0, so the values have a logarithm).

Shapes: gate / forget / input / hidden (B, T, D) pre-activations, h0 (B, D) or None (zeros); returns
(h (B, T, D), h_last (B, D)). Any T >= 1. `impl`:

- "log" (Heinsen): log h_t = a*_t + logcumsumexp(log b - a*)_t with a* = cumsum(log a). The initial state enters
  linearly (h_t += exp(a*_t) h0), so h0 may have any sign. Precision caveat of this form: over long sequences with
  strong decay, |a*| grows like T and the sum a*_t + logcumsumexp(...) cancels; in float32 the relative error of h is
  about |a*_t| * 6e-8.
- "chunked": `linear_recurrence_chunked` on (log a, exp(log b)); no cancellation (products inside one chunk only).
- "reference": the plain loop over the equations above (sigmoid, ratios), independent of the log-space algebra.
- "triton": the fused GPU kernel of `triton.py` (gate math + scan in one pass, float32 in linear space; inputs
  float32/float16/bfloat16 on CUDA). "auto": "triton" for such inputs on CUDA when Triton is importable, else "log".

`document_starts` (B, T) bool or None: h is zero before each start (a_t = 0 there), so a packed row equals separate
calls per document (revival/ops/_documents.py). The log-space scan has no segmented form, so "log" (and "auto" off
CUDA) run such rows on "chunked" (exact, no cancellation). The Triton kernel takes the starts folded into its inputs
(`_resets_as_inputs`): at a start the gate saturates (a = sigmoid(-40) ~ 4e-18, the previous h is dropped to float32
precision) and the hidden pre-activation becomes g^-1 of the start's own b, so h there is b exactly (to rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import check_shape, validate_recurrence
from .._common import compute_dtype
from .._documents import check_document_starts
from .chunkwise import linear_recurrence_chunked
from .reference import g, linear_recurrence_reference, mingru_reference, minlstm_reference

__all__ = [
    "IMPLS",
    "g",
    "linear_recurrence_chunked",
    "linear_recurrence_reference",
    "log_g",
    "log_space_scan",
    "mingru_log_terms",
    "mingru_scan",
    "mingru_step",
    "minlstm_log_terms",
    "minlstm_scan",
    "minlstm_step",
    "resolve_impl",
]

IMPLS = ("log", "chunked", "reference", "triton", "auto")


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """The implementation `impl` stands for on input `x` ("auto" -> "triton" on CUDA where it can run, else "log")."""
    _check_impl(impl)
    if impl != "auto":
        return impl
    if x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from .triton import available

        return "triton" if available() else "log"
    return "log"


def log_g(x: torch.Tensor) -> torch.Tensor:
    """log g(x), computed stably: log(x + 0.5) for x >= 0, -softplus(-x) otherwise."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


def mingru_log_terms(gate: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log a, log b) of minGRU: log(1 - z) = -softplus(gate), log(z htilde) = -softplus(-gate) + log g(hidden)."""
    return -F.softplus(gate), -F.softplus(-gate) + log_g(hidden)


def minlstm_log_terms(
    forget: torch.Tensor, input: torch.Tensor, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log a, log b) of minLSTM: diff = softplus(-forget) - softplus(-input), log f' = -softplus(diff),
    log(i' htilde) = -softplus(-diff) + log g(hidden)."""
    diff = F.softplus(-forget) - F.softplus(-input)
    return -F.softplus(diff), -F.softplus(-diff) + log_g(hidden)


def log_space_scan(
    log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heinsen's scan for h_t = a_t h_{t-1} + b_t with b > 0 given as logs; h0 (B, D) of any sign or None.

    log_a, log_b: (B, T, D). Returns (h (B, T, D) in the input dtype, h_last (B, D) in float32/float64).
    """
    validate_recurrence(log_a, log_b, h0, names=("log_a", "log_b"))
    out_dtype, dtype = log_b.dtype, compute_dtype(log_b)
    log_a, log_b = log_a.to(dtype), log_b.to(dtype)
    a_star = torch.cumsum(log_a, dim=1)  # (B, T, D)
    h = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=1))
    if h0 is not None:
        h = h + torch.exp(a_star) * h0.to(dtype)[:, None]
    return h.to(out_dtype), h[:, -1]


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def _resolve_with_documents(impl: str, x: torch.Tensor, document_starts) -> tuple[str, torch.Tensor | None]:
    _check_impl(impl)
    document_starts = check_document_starts(document_starts, x.shape[0], x.shape[1], x.device)
    if document_starts is None:
        return resolve_impl(impl, x), None
    impl = resolve_impl(impl, x)
    return ("chunked" if impl == "log" else impl), document_starts


RESET_GATE = 40.0  # sigmoid(40) is 1.0 in float32, sigmoid(-40) ~ 4e-18: what a saturated gate keeps of h


def _g_inverse(y: torch.Tensor) -> torch.Tensor:
    """x with g(x) = y > 0 (g of reference.py), both branches kept finite so that the gradient is too."""
    y = y.clamp_min(torch.finfo(y.dtype).tiny)
    small = y < 0.5
    y_small, y_large = torch.where(small, y, 0.25), torch.where(small, 0.5, y)
    return torch.where(small, torch.log(y_small) - torch.log1p(-y_small), y_large - 0.5)


def _resets_as_inputs(gate_like, hidden, b_log, h0, document_starts, saturate):
    """Pre-activations for the Triton kernel on packed rows: at each start the gates in `saturate` (their
    pre-activations, sign included) replace the originals, and hidden becomes g^-1(exp(b_log)), the start's own
    b = (input weight) * g(hidden); h0 rows that start at t = 0 are zeroed."""
    starts = document_starts[..., None]
    hidden = torch.where(starts, _g_inverse(torch.exp(b_log)).to(hidden.dtype), hidden)
    gates = [torch.where(starts, torch.full_like(x, value), x) for x, value in zip(gate_like, saturate)]
    if h0 is not None:
        h0 = torch.where(document_starts[:, :1], 0.0, h0)
    return gates, hidden, h0


def _scan_log_terms(log_a, log_b, h0, impl: str, chunk_size: int, out_dtype: torch.dtype, document_starts=None):
    if impl == "log":
        h, h_last = log_space_scan(log_a, log_b, h0)
    else:
        if document_starts is not None:  # a_t = 0 at a start: the state before it is dropped exactly
            log_a = log_a.masked_fill(document_starts[..., None], float("-inf"))
        h, h_last = linear_recurrence_chunked(log_a, torch.exp(log_b), h0, chunk_size)
    return h.to(out_dtype), h_last


def mingru_scan(
    gate: torch.Tensor, hidden: torch.Tensor, h0: torch.Tensor | None = None, *, impl: str = "log",
    chunk_size: int = 64, document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """minGRU over a sequence. gate, hidden: (B, T, D) pre-activations; h0: (B, D) or None; document_starts (B, T)
    bool or None. -> (h, h_last)."""
    _check_impl(impl)
    validate_recurrence(gate, hidden, h0, names=("gate", "hidden"))
    impl, document_starts = _resolve_with_documents(impl, gate, document_starts)
    if impl == "triton":
        from .triton import mingru_scan_triton

        if document_starts is not None:
            _, log_b = mingru_log_terms(gate.float(), hidden.float())
            (gate,), hidden, h0 = _resets_as_inputs([gate], hidden, log_b, h0, document_starts, [RESET_GATE])
        return mingru_scan_triton(gate, hidden, h0)
    if impl == "reference":
        return mingru_reference(gate, hidden, h0, document_starts)
    dtype = compute_dtype(gate)
    log_a, log_b = mingru_log_terms(gate.to(dtype), hidden.to(dtype))
    return _scan_log_terms(log_a, log_b, h0, impl, chunk_size, gate.dtype, document_starts)


def minlstm_scan(
    forget: torch.Tensor, input: torch.Tensor, hidden: torch.Tensor, h0: torch.Tensor | None = None, *,
    impl: str = "log", chunk_size: int = 64, document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """minLSTM over a sequence. forget, input, hidden: (B, T, D) pre-activations; h0: (B, D) or None;
    document_starts (B, T) bool or None."""
    _check_impl(impl)
    validate_recurrence(forget, hidden, h0, names=("forget", "hidden"))
    check_shape("input", input, tuple(forget.shape))
    impl, document_starts = _resolve_with_documents(impl, forget, document_starts)
    if impl == "triton":
        from .triton import minlstm_scan_triton

        if document_starts is not None:
            _, log_b = minlstm_log_terms(forget.float(), input.float(), hidden.float())
            (forget, input), hidden, h0 = _resets_as_inputs([forget, input], hidden, log_b, h0, document_starts,
                                                            [-RESET_GATE, RESET_GATE])
        return minlstm_scan_triton(forget, input, hidden, h0)
    if impl == "reference":
        return minlstm_reference(forget, input, hidden, h0, document_starts)
    dtype = compute_dtype(forget)
    log_a, log_b = minlstm_log_terms(forget.to(dtype), input.to(dtype), hidden.to(dtype))
    return _scan_log_terms(log_a, log_b, h0, impl, chunk_size, forget.dtype, document_starts)


def mingru_step(gate: torch.Tensor, hidden: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One minGRU step: gate, hidden (B, D) pre-activations, h (B, D) previous state -> new state (B, D)."""
    z = torch.sigmoid(gate)
    return torch.sigmoid(-gate) * h + z * g(hidden)


def minlstm_step(forget: torch.Tensor, input: torch.Tensor, hidden: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One minLSTM step: forget, input, hidden (B, D) pre-activations, h (B, D) previous state -> new state."""
    log_a, log_b = minlstm_log_terms(forget, input, hidden)
    return torch.exp(log_a) * h + torch.exp(log_b)
