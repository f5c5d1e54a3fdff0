"""Parallel Newton solves of nonlinear recurrences h_t = f(h_{t-1}, x_t): DEER, quasi-DEER, ELK (docs/math.md).

    h, result = newton_solve(PARAGRU, x, h0, (a,), method="deer")     # h (B, T, N); result.iterations, .residual

- `newton_solve` (solver.py): Newton over the whole sequence, each step one parallel linear scan; gradients by the
  adjoint scan at the solution. Methods "deer" / "quasi" / "elk"; tol, max_iters, initial_guess, on_failure.
- `sequential_solve` (reference.py): the plain loop it must match (float64 to ~1e-10).
- `linear_scan` (scan.py): x_t = A_t x_{t-1} + b_t for diagonal and block A, in PyTorch; the Triton kernels for
  diagonal and 2 x 2 blocks are in triton/ (CUDA, float32 states, any float inputs).
- Cells (cells.py): PARAGRU, PARALSTM (ParaRNN), SLSTM (xLSTM, per-head blocks), DENSE_GRU / DENSE_LSTM (full
  Jacobians by torch.func); `Cell` to write your own.
- `slstm_newton` (slstm.py): the sLSTM op's (c, n, m, y) interface, behind `revival.ops.slstm(impl="newton")`.
"""

from .cells import DENSE_GRU, DENSE_LSTM, PARAGRU, PARALSTM, SLSTM, Cell, autograd_jacobian
from .elk import elk_step
from .reference import sequential_solve
from .scan import STRUCTURES, linear_scan, linear_scan_reference
from .slstm import slstm_newton
from .solver import METHODS, ON_FAILURE, NewtonConvergenceError, NewtonResult, newton_solve

__all__ = [
    "Cell",
    "DENSE_GRU",
    "DENSE_LSTM",
    "METHODS",
    "NewtonConvergenceError",
    "NewtonResult",
    "ON_FAILURE",
    "PARAGRU",
    "PARALSTM",
    "SLSTM",
    "STRUCTURES",
    "autograd_jacobian",
    "elk_step",
    "linear_scan",
    "linear_scan_reference",
    "newton_solve",
    "sequential_solve",
    "slstm_newton",
]
