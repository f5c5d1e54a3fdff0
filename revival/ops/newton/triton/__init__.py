"""Triton kernels of the Newton solver (GPU; TRITON_INTERPRET=1 runs them on CPU for tests).

- `diagonal_scan_triton(coeff, rhs, reverse)`: x_t = a_t x_{t-1} + b_t elementwise (B, T, *S), float32 out.
- `block2_scan_triton(coeff, rhs, reverse)`: 2 x 2 blocks, coeff (B, T, G, 2, 2), rhs (B, T, G, 2).
- `paragru_newton_step_triton` / `paralstm_newton_step_triton`: one whole Newton step of the ParaRNN cells in one
  pass (step value, Jacobian, residual and the scan of the update), reading the pre-activations in their own dtype
  (bf16 fine) with float32 states; returns (next iterate, residual of the current one).

Reference beside them: `revival.ops.newton.scan.linear_scan` and the cells' PyTorch Jacobians (tests compare).
"""

from .scan import (
    available,
    block2_scan_triton,
    diagonal_scan_triton,
    paragru_newton_step_triton,
    paralstm_newton_step_triton,
)

__all__ = [
    "available",
    "block2_scan_triton",
    "diagonal_scan_triton",
    "paragru_newton_step_triton",
    "paralstm_newton_step_triton",
]
