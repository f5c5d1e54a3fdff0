"""Newton's method over the whole sequence (DEER / quasi-DEER / ELK) and its adjoint backward (docs/math.md).

The T equations h_t = f(h_{t-1}, x_t) are one system in the trajectory h. Each iteration evaluates, at every t at
once, the step value f_t = f(h_{t-1}, x_t) and its Jacobian J_t, then solves the linearised system

    delta_t = J_t delta_{t-1} + (f_t - h_t),   delta_0 = 0        (one parallel scan, `scan.linear_scan`)

and updates h += delta. "deer" uses the cell's Jacobian (diagonal or block), "quasi" its diagonal only. "elk" is
the stabilised one: the diagonal Jacobian, ELK's Levenberg-Marquardt step (`elk.elk_step`, weight `damping`) and a
trust region in time: the step is cut at the first t (past the first unconverged one) where
|delta_t| > trust_radius (1 + |h_t|) or overflows, so an expanding linearisation cannot blow the iterate up.
With damping = 0 (the default; damping > 0 trades the exactness below for smaller steps, docs/math.md),
after k iterations of any method h_1..h_k are exact, so T iterations always reach the solution; usually a few do.
Convergence: max_t |h_t - f_t| / (1 + |h_t|) <= tol.

Backward (implicit function theorem, no backprop through the iterations): with g_t = dL/dh_t, the adjoint
lambda_t = g_t + J_{t+1}^T lambda_{t+1} is one reverse scan with the exact (full) Jacobians at the solution; then
the gradients of x, the weights and h0 are one vector-Jacobian product of the step over all t with cotangent lambda.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cells import PARAGRU, PARALSTM, Cell
from .elk import elk_step
from .reference import sequential_solve
from .scan import linear_scan

__all__ = ["METHODS", "ON_FAILURE", "NewtonConvergenceError", "NewtonResult", "newton_solve"]

METHODS = ("deer", "quasi", "elk")
ON_FAILURE = ("raise", "sequential", "return")
SCAN_IMPLS = ("auto", "torch", "triton")


@dataclass
class NewtonResult:
    """What the solve did. `residual` is max_t |h_t - f(h_{t-1}, x_t)| / (1 + |h_t|) of the returned trajectory."""

    method: str
    iterations: int  # Newton updates tried (ELK: accepted or rejected)
    residual: float
    converged: bool
    fell_back: bool = False  # the trajectory came from the sequential loop
    tol: float = 0.0


class NewtonConvergenceError(RuntimeError):
    def __init__(self, result: NewtonResult):
        super().__init__(
            f"newton_solve: method={result.method!r} did not converge: residual {result.residual:.3g} > tol "
            f"{result.tol:.3g} after {result.iterations} iterations; raise max_iters, use method='elk', or pass "
            f"on_failure='sequential' to fall back to the sequential loop")
        self.result = result


def _shift(cell: Cell, h: torch.Tensor, h0: torch.Tensor, starts: torch.Tensor | None = None) -> torch.Tensor:
    """h_{t-1} for t = 1..T: h0 then h_1..h_{T-1}; the cell's empty state (zeros) where a document starts."""
    prev = torch.cat((h0[:, None], h[:, :-1]), dim=1)
    return prev if starts is None else cell.restart(prev, _expand(starts, prev))


def _expand(starts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return starts.reshape(*starts.shape, *(1,) * (like.ndim - 2))


def _jacobian(cell: Cell, h, h0, x, weights, starts, diagonal: bool):
    """Step value and Jacobian at the iterate h; the Jacobian is zero where a document starts (no dependence)."""
    value, jac = cell.jacobian(_shift(cell, h, h0, starts), x, *weights, diagonal=diagonal)
    return value, (jac if starts is None else jac.masked_fill(_expand(starts, jac), 0.0))


def _residual(value: torch.Tensor, h: torch.Tensor) -> float:
    res = ((value - h).abs() / (1 + h.abs())).max()
    return float(res)  # nan / inf when the iterate blew up


def _scan(coeff, rhs, structure: str, scan_impl: str, reverse: bool = False) -> torch.Tensor:
    if scan_impl != "torch" and rhs.is_cuda and rhs.dtype == torch.float32:
        from .triton import available, block2_scan_triton, diagonal_scan_triton

        small_block = structure == "block" and rhs.shape[-1] == 2
        if available() and (structure == "diagonal" or small_block):
            kernel = diagonal_scan_triton if structure == "diagonal" else block2_scan_triton
            return kernel(coeff, rhs, reverse=reverse)
    if scan_impl == "triton" and not rhs.is_cuda:
        raise ValueError(f"scan_impl: 'triton' needs CUDA tensors, got device {rhs.device.type}")
    return linear_scan(coeff, rhs, structure=structure, reverse=reverse)


def _fused_step(cell: Cell, method: str, x: torch.Tensor, scan_impl: str):
    """The one-kernel Newton step for this cell on this device, or None (then the PyTorch step + scan)."""
    if scan_impl == "torch" or not x.is_cuda or x.dtype == torch.float64:
        return None
    from .triton import available, paragru_newton_step_triton, paralstm_newton_step_triton

    exact = method == "deer" or (method == "quasi" and cell.structure == "diagonal")
    kernels = {PARAGRU.name: paragru_newton_step_triton, PARALSTM.name: paralstm_newton_step_triton}
    return kernels.get(cell.name) if exact and available() and cell in (PARAGRU, PARALSTM) else None


def _iterate_fused(step, x, h0, weights, h, tol, max_iters, method) -> tuple:
    iterations = 0
    while True:
        h_next, residual = step(x, h, h0, *weights)  # residual of h; h_next = h + its Newton update
        if residual <= tol or not math.isfinite(residual) or iterations >= max_iters:
            return h, NewtonResult(method, iterations, residual, residual <= tol, tol=tol)
        h, iterations = h_next, iterations + 1


def _trust_region(delta: torch.Tensor, h: torch.Tensor, unconverged: torch.Tensor, radius: float) -> torch.Tensor:
    """Keep delta_t up to (not including) the first t, after the first unconverged one, where it leaves
    |delta| <= radius (1 + |h|) or is not finite; zero after that. The first unconverged step always moves, so the
    exact prefix still grows by one per iteration."""
    B, T = delta.shape[:2]
    outside = ~(delta.abs() <= radius * (1 + h.abs())).reshape(B, T, -1).any(-1)  # (B, T), NaN counts as outside
    after_first = torch.cat((torch.zeros_like(unconverged[:, :1]), unconverged[:, :-1]), 1).cumsum(1) > 0
    keep = ((outside & after_first).cumsum(1) == 0).reshape(B, T, *(1,) * (delta.ndim - 2))
    return torch.where(keep, delta, torch.zeros_like(delta))


def _iterate(cell: Cell, x, h0, weights, guess, method, tol, max_iters, damping, trust_radius, scan_impl,
             starts) -> tuple:
    fused = None if starts is not None else _fused_step(cell, method, x, scan_impl)
    if fused is not None:
        return _iterate_fused(fused, x, h0, weights, guess, tol, max_iters, method)
    structure = cell.structure if method == "deer" else "diagonal"
    diagonal = method != "deer"
    h = guess
    value, jac = _jacobian(cell, h, h0, x, weights, starts, diagonal)
    residual, iterations = _residual(value, h), 0
    while not residual <= tol and math.isfinite(residual) and iterations < max_iters:
        iterations += 1
        if method == "elk":
            unconverged = ((value - h).abs() / (1 + h.abs()) > tol).reshape(h.shape[0], h.shape[1], -1).any(-1)
            h = h + _trust_region(elk_step(jac, value - h, damping), h, unconverged, trust_radius)
        else:
            h = h + _scan(jac, value - h, structure, scan_impl)
        value, jac = _jacobian(cell, h, h0, x, weights, starts, diagonal)
        residual = _residual(value, h)
    return h, NewtonResult(method, iterations, residual, residual <= tol, tol=tol)


def _solve(cell, x, h0, weights, options) -> tuple[torch.Tensor, NewtonResult]:
    guess, starts = options["initial_guess"], options["document_starts"]
    if guess is None:  # f(0, x_t) at every t (h0 at t = 1): the first state is then already exact
        zeros = torch.zeros((x.shape[0], x.shape[1], *h0.shape[1:]), dtype=h0.dtype, device=h0.device)
        guess = cell.step(_shift(cell, zeros, h0, starts), x, *weights)
    h, result = _iterate(cell, x, h0, weights, guess, options["method"], options["tol"], options["max_iters"],
                         options["damping"], options["trust_radius"], options["scan_impl"], starts)
    if result.converged or options["on_failure"] == "return":
        return h, result
    if options["on_failure"] == "raise":
        raise NewtonConvergenceError(result)
    h = sequential_solve(cell, x, h0, weights, starts)
    value = cell.step(_shift(cell, h, h0, starts), x, *weights)
    result.residual, result.fell_back = _residual(value, h), True
    return h, result


class _NewtonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, options, record, h0, x, *weights):
        h, record["result"] = _solve(cell, x, h0, weights, options)
        ctx.cell, ctx.scan_impl, ctx.starts = cell, options["scan_impl"], options["document_starts"]
        ctx.save_for_backward(h0, x, h, *weights)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        h0, x, h, *weights = ctx.saved_tensors
        cell = ctx.cell
        h_prev = _shift(cell, h, h0, ctx.starts)
        _, jac = _jacobian(cell, h, h0, x, weights, ctx.starts, diagonal=False)
        later = torch.cat((jac[:, 1:], torch.zeros_like(jac[:, :1])), dim=1)  # J_{t+1}, and 0 after the end
        coeff = later if cell.structure == "diagonal" else later.transpose(-1, -2)
        adjoint = _scan(coeff, grad_h.contiguous(), cell.structure, ctx.scan_impl, reverse=True)
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((h_prev, x, *weights), needs)]
            out = cell.step(*inputs)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, adjoint, allow_unused=True))
        grads = [next(grads) if t.requires_grad else None for t in inputs]
        if grads[0] is not None:
            grads[0] = grads[0][:, 0]  # dL/dh0 = J_1^T lambda_1 (0 where the first step starts a document)
            if ctx.starts is not None:
                first = ctx.starts[:, 0].reshape(-1, *(1,) * (grads[0].ndim - 1))
                grads[0] = grads[0].masked_fill(first, 0.0)
        return (None, None, None, *grads)


def newton_solve(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor,
    weights: tuple[torch.Tensor, ...] = (),
    *,
    method: str = "deer",
    tol: float | None = None,
    max_iters: int | None = None,
    initial_guess: torch.Tensor | None = None,
    on_failure: str = "raise",
    damping: float = 0.0,
    trust_radius: float = 10.0,
    scan_impl: str = "auto",
    document_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, NewtonResult]:
    """Solve h_t = cell.step(h_{t-1}, x_t, *weights) for t = 1..T in parallel; returns (h (B, T, *S), result).

    x: (B, T, ...) per-step inputs (time on dim 1); h0: (B, *S) the state before t = 1; weights: tensors shared by
    all steps. method: "deer" (the cell's Jacobian), "quasi" (its diagonal), "elk" (diagonal, Levenberg-Marquardt
    weight `damping`, steps cut where they leave |delta_t| <= trust_radius (1 + |h_t|)).
    tol: on max_t |h_t - f_t| / (1 + |h_t|); None: 1e-12 in float64, 1e-5 otherwise. max_iters: None means T
    (always enough with damping = 0), 2T + 32 with damping > 0. initial_guess: (B, T, *S), e.g. a previous
    solution; None: f(0, x_t). on_failure: "raise" (NewtonConvergenceError), "sequential" (run the loop;
    result.fell_back) or "return" (keep the last iterate; result.converged False). document_starts: (B, T) bool
    or None; the state restarts at each start from the cell's empty state (zeros; the sLSTM's empty memory):
    h_{t-1} := empty there, so J_t = 0 and the step is f(empty, x_t): packed documents, exactly.
    Computes in float64 for float64 x, else float32 (16-bit x is read as is), autocast off; h is in that dtype.
    Gradients flow to x, h0 and the weights through the adjoint scan at the returned trajectory.
    """
    if not isinstance(cell, Cell):
        raise ValueError(f"cell: expected a revival.ops.newton.Cell, got {type(cell).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure: expected one of {ON_FAILURE}, got {on_failure!r}")
    if scan_impl not in SCAN_IMPLS:
        raise ValueError(f"scan_impl: expected one of {SCAN_IMPLS}, got {scan_impl!r}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[1] == 0:
        raise ValueError(f"x: expected a tensor of shape (B, T >= 1, ...), got {getattr(x, 'shape', type(x))}")
    if not isinstance(h0, torch.Tensor) or h0.shape[0] != x.shape[0]:
        raise ValueError(f"h0: expected a tensor of shape (B={x.shape[0]}, ...), got {getattr(h0, 'shape', h0)}")
    if damping < 0:
        raise ValueError(f"damping: expected >= 0, got {damping}")
    if not trust_radius > 0:
        raise ValueError(f"trust_radius: expected > 0, got {trust_radius}")
    T = x.shape[1]
    if max_iters is None:
        max_iters = T if damping == 0 else 2 * T + 32
    if max_iters < 0:
        raise ValueError(f"max_iters: expected >= 0 or None, got {max_iters}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if tol is None:
        tol = 1e-12 if dtype == torch.float64 else 1e-5
    if initial_guess is not None:
        want = (x.shape[0], T, *h0.shape[1:])
        if tuple(initial_guess.shape) != want:
            raise ValueError(f"initial_guess: expected shape {want}, got {tuple(initial_guess.shape)}")
        initial_guess = initial_guess.detach().to(dtype)
    if document_starts is not None:
        if tuple(document_starts.shape) != (x.shape[0], T) or document_starts.dtype != torch.bool:
            raise ValueError(f"document_starts: expected a bool tensor of shape {(x.shape[0], T)}, got "
                             f"{getattr(document_starts, 'dtype', type(document_starts))} "
                             f"{tuple(getattr(document_starts, 'shape', ()))}")
        document_starts = document_starts.to(x.device)
    options = {"document_starts": document_starts, "method": method, "tol": float(tol), "max_iters": int(max_iters),
               "initial_guess": initial_guess,
               "on_failure": on_failure, "damping": float(damping), "trust_radius": float(trust_radius),
               "scan_impl": scan_impl}
    with torch.autocast(x.device.type, enabled=False):
        x = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(dtype)  # 16-bit x: read as is, math in fp32
        h0 = h0.to(dtype)
        weights = tuple(w.to(dtype) for w in weights)
        tensors = (h0, x, *weights)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            record: dict = {}
            h = _NewtonFunction.apply(cell, options, record, *tensors)
            return h, record["result"]
        with torch.no_grad():
            return _solve(cell, x, h0, weights, options)
