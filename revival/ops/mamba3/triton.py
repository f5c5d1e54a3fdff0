"""Mamba-3 SISO (R = 1) on revival's Triton SSD kernels (GPU; `TRITON_INTERPRET=1` for CPU tests).

Why this route: in the rotating frame SISO Mamba-3 is a scalar-decay SSM with a rank-2 input whose two weights both
carry dt_t (c_t = lam_t dt_t on the current token, b_t = (1 - lam_t) dt_t a_t on the previous one), so it is exactly
SSD (S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t) on 2H heads sharing dt, A and C~:

    head h:      x_t <- lam_t x_t,                 B_t <- B~_t = R(phi_t)^T B_t
    head H + h:  x_t <- (1 - lam_t) a_t x_{t-1},   B_t <- B~_{t-1}   (weight 0 at a document start)
    y = y_h + y_{H+h} + D x,   g_T = S_h + S_{H+h},   S_0 = (g_0, 0)

SSD's forward and backward kernels do the chunks and their gradients; the angles and RoPE on B and C, written
straight into the 2H-head keys and queries, are a Triton kernel pair of their own (`frame_triton.py`, forward and
backward); the shift of x by one token with the trapezoid's weights into the 2H heads, and the sum of the two heads'
outputs with the skip term D x, are one Triton pass each way (`glue_triton.py`). A
one-SSD form exists (fold the previous-token term into the state: input weight
lam_t dt_t + (1 - lam_{t+1}) dt_{t+1} plus a diagonal correction of y) but needs that weight divided by dt_t for SSD's
dt-weighted input, whose gradient then cancels large terms in 16 bits; the 2H form divides by nothing.

`mamba3_triton(x, dt, A, lam, B, C, theta, D, state, chunk_size=64, document_starts=None, launch=None)` has the
contract of `revival.ops.mamba3.mamba3` (inputs validated, the state given whole) for R = 1; `mamba3_step_triton`
is one token of it (decode, no gradients) on SSD's step kernel. y in x's dtype, the state float32.
"""

from __future__ import annotations

import torch

from .._common import compute_dtype
from .._documents import drop_state_at_first_start
from ..ssd.triton import LaunchConfig, ssd_step_triton, ssd_triton
from .chunkwise import rotating_frame
from .frame_triton import rotating_frame_triton
from .glue_triton import combine_heads, two_head_inputs

__all__ = ["mamba3_step_triton", "mamba3_triton"]


def check_siso(x: torch.Tensor) -> None:
    """The Triton path runs R = 1 only: a ValueError naming x's rank otherwise."""
    if x.shape[3] != 1:
        raise ValueError(f"x: impl='triton' runs SISO Mamba-3 (R = 1) only, got R = {x.shape[3]} (MIMO); use "
                         "impl='chunkwise' or 'auto'")


def mamba3_triton(x, dt, A, lam, B, C, theta, D, state, *, chunk_size: int = 64,
                  document_starts: torch.Tensor | None = None, launch: LaunchConfig | None = None):
    """SISO Mamba-3 as SSD on 2H heads (module doc). Shapes as `revival.ops.mamba3` with R = 1; `state` the whole
    tuple (angle, ssm, previous B, previous x); `launch` reaches the SSD kernels. Returns (y, state)."""
    check_siso(x)
    dtype = compute_dtype(x)
    angle0, g0, prev_B, prev_x = (t.to(dtype) for t in state)
    # keys (n, T, 2H, N): one group a head, B~_t then B~_{t-1}; queries C~_t for both; in x's dtype for SSD
    keys, queries, angle_last = rotating_frame_triton(dt, theta, B.squeeze(3), C.squeeze(3), angle0,
                                                      prev_B.squeeze(2), document_starts, dtype=x.dtype)
    H = x.shape[2]
    xs = x.squeeze(3)  # a view (squeeze, not select: select's backward writes a zero tensor, then copies)
    inputs = two_head_inputs(xs, dt, A, lam, prev_x.squeeze(2), document_starts)
    S0 = torch.cat([g0, torch.zeros_like(g0)], dim=1)
    y, S = ssd_triton(inputs, dt.repeat(1, 1, 2), A.repeat(2), keys, queries, None,
                      S0, chunk_size=chunk_size, document_starts=document_starts, launch=launch)
    y = combine_heads(y, xs, D)[:, :, :, None]
    return y, (angle_last, S[:, :H] + S[:, H:], B[:, -1].to(dtype), xs[:, -1, :, None].to(dtype))


def mamba3_step_triton(x, dt, A, lam, B, C, theta, D, state, *, document_starts: torch.Tensor | None = None):
    """One token (T = 1, no gradients) on SSD's step kernel: the previous-token term b_1 x_0 B~_0^T = a_1 (1 - lam_1)
    dt_1 x_0 B~_0^T is added to the memory before the step, which then decays it with the rest. Returns (y, state)."""
    check_siso(x)
    state = drop_state_at_first_start(tuple(state), document_starts)
    frame = rotating_frame(x, dt, A, lam, B, C, theta, state, None)
    weight = (1 - frame.current_weight[:, 0]) * frame.dt[:, 0]  # (n, H): b_1 / a_1
    memory = frame.g0 + weight[..., None, None] * frame.x_prev[:, 0, :, 0, :, None] * frame.B_prev[:, 0, :, 0, None, :]
    y, g = ssd_step_triton((frame.current_weight[:, 0, :, None] * frame.x[:, 0, :, 0]).to(x.dtype), frame.dt[:, 0],
                           A, frame.B_rot[:, 0, :, 0], frame.C_rot[:, 0, :, 0], None,
                           memory)
    y = y.float()[:, None, :, None] + (0 if D is None else D.float()[:, None, None] * frame.x)
    return y.to(x.dtype), frame.final_state(g)
