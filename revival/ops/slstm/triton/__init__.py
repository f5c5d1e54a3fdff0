"""Triton sLSTM (GPU): one program per (batch block, head) walks time; forward and backward kernels.

Layout (contiguous): x_gates (B, T, 4, H, d), gate order (i, f, z, o); recurrent_weight R (4, H, d, d), applied as
`raw[:, g, h] = x[:, g, h] + y_prev[:, h] @ R[g, h]`. Math as `reference.py` (docs/math.md "sLSTM"), including the
per-unit first-step rule (m = i and fbar = 0 where n_{t-1} == 0, checked at every step).

Design:
- grid (ceil(B / BLOCK_B), H); BLOCK_B >= 16 (tl.dot needs block dims >= 16; padded rows are masked), the head dim
  is padded to D = next power of two >= 16 (padded units are masked and kept at exactly 0).
- Three ways to form `y_{t-1} @ R[g]` (and `graw_t @ R[g]^T` in the backward), chosen by `weights`:
  "split" (large heads: the head's units spread over several programs, `split.py`), and (`kernels.py`)
  resident: the head's four (D, D) weight tiles are loaded once before the time loop and stay on chip (registers /
  shared memory; fits for small D); streamed: every step re-reads R in (BLOCK_K, D) slices (L1/L2 hits, not HBM)
  and reads the previous step's y (gate gradients) back from the buffer this kernel just wrote, in BLOCK_K-column
  slices, so on-chip memory stays O(BLOCK_K x D) for any head dim. One step's store and the next step's loads of
  that buffer are ordered by a CTA barrier.
- Precision: float32 inputs use float32-accurate products ("tf32x3": three TF32 products of split operands, exact
  "ieee" under the interpreter); bfloat16 inputs use
  bfloat16 products of y_{t-1} and R with float32 accumulation (R rounded to bfloat16 once). States, gate math and
  everything saved for the backward are float32.
- Forward saves the pre-activations (B, T, 4, H, d) and the states c, n, m (B, T+1, 3, H, d) and y (B, T+1, H, d)
  in float32 (index 0 = initial state). Backward is a reverse-time kernel carrying dL/d(c, n, m) and
  `sum_g g_raw[t+1, g] @ R[g]^T`; it writes dL/draw (B, T, 4, H, d). The weight gradient is then one einsum over
  all (b, t) (a cuBLAS GEMM with K = B*T, faster than per-program register accumulation at small B).
- Document starts (B, T) (docs/math.md): at a start the kernels read the zero state (c, n, m, y) instead of
  the carried one (the saved buffers keep the previous document's final state, which is its output), and the
  backward passes no gradient from a start to the state before it; the weight gradient sees y_{t-1} = 0 there.
- Under TRITON_INTERPRET=1 (CPU tests) the products are float32 (the interpreter mis-multiplies bfloat16 matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._triton import INTERPRET, available, require_triton

__all__ = ["LaunchConfig", "WEIGHT_MODES", "available", "slstm_triton"]

WEIGHT_MODES = ("resident", "streamed", "split")


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of the Triton sLSTM kernels; a field left None takes its shape-keyed default
    (`launch_config`). Results agree to rounding whatever the settings.

    weights: how R is held across steps, one of WEIGHT_MODES ("resident": on chip, one program per head;
    "streamed": re-read in (block_k, D) slices every step; "split": the head's units spread over programs of
    split_units units each, exchanging y every step); num_warps: per program.
    """

    weights: str | None = None
    block_k: int | None = None
    num_warps: int | None = None
    split_units: int | None = None


def launch_config(d: int, dot_bf16: bool, requested: LaunchConfig | None = None) -> tuple[int, LaunchConfig]:
    """(D, the complete config) for head dim d: D = d padded to a power of two >= 16; default `weights`: "resident"
    while the head's four (D, D) weight tiles fit `weight_budget` (bf16 D <= 128, fp32 D <= 64; on an H100 bf16
    d=128 resident measured 30 ms vs 47 ms streamed, docs/kernels.md), else "split" (`split.py`)."""
    from .kernels import weight_budget
    from .split import split_units

    requested = LaunchConfig() if requested is None else requested
    if not isinstance(requested, LaunchConfig):
        raise ValueError(f"launch: expected a LaunchConfig or None, got {type(requested).__name__}")
    D = max(16, 1 << (d - 1).bit_length())
    weights = requested.weights
    if weights is None:
        weights = "resident" if 4 * D * D * (2 if dot_bf16 else 4) <= weight_budget(dot_bf16) else "split"
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights: expected one of {WEIGHT_MODES} or None, got {weights!r}")
    default_warps = 8 if D >= 64 and weights != "split" else 4
    return D, LaunchConfig(
        weights=weights,
        block_k=requested.block_k or min(D, 32),
        num_warps=requested.num_warps or default_warps,
        split_units=requested.split_units or split_units(D, dot_bf16),
    )


BLOCK_B = 16  # batch rows per program: tl.dot's minimum; more rows per program would leave SMs idle at small B


class _SLSTMTriton(torch.autograd.Function):
    """x_gates (B, T, 4, H, d) float32/bfloat16/float16; recurrent_weight (4, H, d, d); c0, n0, m0, y0 (B, H, d)
    float32; starts (B, T) int8 or None. Returns y (B, T, H, d) in x_gates' dtype and the final c, n, m, y
    (float32)."""

    @staticmethod
    def forward(ctx, x_gates, recurrent_weight, c0, n0, m0, y0, starts, launch):
        from .kernels import _slstm_forward_kernel

        B, T, G, H, d = x_gates.shape
        dot_bf16 = x_gates.dtype == torch.bfloat16 and not INTERPRET
        r_dot = recurrent_weight.detach().to(torch.bfloat16 if dot_bf16 else torch.float32).contiguous()
        x = x_gates.contiguous()
        f32 = dict(dtype=torch.float32, device=x.device)
        raw = torch.empty(B, T, G, H, d, **f32)
        cnm = torch.empty(B, T + 1, 3, H, d, **f32)
        y_all = torch.empty(B, T + 1, H, d, **f32)
        for index, value in enumerate((c0, n0, m0)):
            cnm[:, 0, index] = value
        y_all[:, 0] = y0
        D, cfg = launch_config(d, dot_bf16, launch)
        if cfg.weights == "split":
            from .split import split_forward

            split_forward(x, r_dot, starts, raw, cnm, y_all, D, BLOCK_B, cfg.split_units, dot_bf16, cfg.num_warps)
        else:
            _slstm_forward_kernel[(-(-B // BLOCK_B), H)](
                x, r_dot, r_dot if starts is None else starts, raw, cnm, y_all, B, T, H, d, D=D, BLOCK_B=BLOCK_B,
                BLOCK_K=cfg.block_k, RESIDENT=cfg.weights == "resident", DOT_BF16=dot_bf16,
                HAS_STARTS=starts is not None, num_warps=cfg.num_warps, num_stages=1,
            )  # fmt: skip
        ctx.save_for_backward(r_dot, raw, cnm, y_all)
        ctx.starts = starts
        ctx.config = (D, cfg, dot_bf16, x_gates.dtype, recurrent_weight.dtype)
        final = (cnm[:, T, 0], cnm[:, T, 1], cnm[:, T, 2], y_all[:, T])
        return (y_all[:, 1:].to(x_gates.dtype), *(s.contiguous() for s in final))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_c, grad_n, grad_m, grad_y_last):
        from .kernels import _slstm_backward_kernel

        r_dot, raw, cnm, y_all = ctx.saved_tensors
        starts = ctx.starts
        D, cfg, dot_bf16, x_dtype, r_dtype = ctx.config
        B, T, G, H, d = raw.shape
        f32 = dict(dtype=torch.float32, device=raw.device)
        gy = torch.zeros(B, T, H, d, **f32) if grad_y is None else grad_y.to(torch.float32).contiguous().clone()
        if grad_y_last is not None:
            gy[:, T - 1] += grad_y_last
        gfinal = torch.zeros(3, B, H, d, **f32)
        for index, grad in enumerate((grad_c, grad_n, grad_m)):
            if grad is not None:
                gfinal[index] = grad
        graw = torch.empty(B, T, G, H, d, **f32)
        ginit = torch.empty(4, B, H, d, **f32)
        if cfg.weights == "split":
            from .split import split_backward

            split_backward(r_dot, starts, raw, cnm, gy, graw, gfinal, D, BLOCK_B, cfg.split_units, dot_bf16,
                           cfg.num_warps)
            ginit[:3] = gfinal  # now dL/d(c_0, n_0, m_0)
            ginit[3] = torch.einsum("bghk,ghjk->bhj", graw[:, 0], r_dot.float())  # dL/dy_0 through step 0's gates
            if starts is not None:
                ginit[3] *= (starts[:, 0] == 0)[:, None, None]
        else:
            _slstm_backward_kernel[(-(-B // BLOCK_B), H)](
                r_dot, r_dot if starts is None else starts, raw, cnm, gy, gfinal, graw, ginit, B, T, H, d, D=D,
                BLOCK_B=BLOCK_B, BLOCK_K=cfg.block_k, RESIDENT=cfg.weights == "resident", DOT_BF16=dot_bf16,
                HAS_STARTS=starts is not None, num_warps=cfg.num_warps, num_stages=1,
            )  # fmt: skip
        g_x = graw.to(x_dtype) if ctx.needs_input_grad[0] else None
        g_r = None
        if ctx.needs_input_grad[1]:  # dR[g, h] = sum_{b, t} y_{t-1}[b, h]^T graw[b, t, g, h], y_{t-1} as read
            y_read = y_all[:, :T] if starts is None else y_all[:, :T] * (starts == 0)[:, :, None, None]
            g_r = torch.einsum("bthd,btghe->ghde", y_read, graw).to(r_dtype)
        return (g_x, g_r, ginit[0], ginit[1], ginit[2], ginit[3], None, None)


def slstm_triton(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state, *,
                 document_starts: torch.Tensor | None = None, launch: LaunchConfig | None = None):
    """sLSTM over a sequence with the Triton kernels. x_gates (B, T, 4, H, d) float32/bfloat16/float16;
    recurrent_weight (4, H, d, d); state (c, n, m, y) each (B, H, d) (converted to float32). Returns y (B, T, H, d)
    in x_gates' dtype and the final state (float32). document_starts (B, T) bool or None: the state is zero before
    each start (a packed row equals separate calls). `launch` (a `LaunchConfig`, None: the defaults by size) picks
    how R is held across steps (`weights`: "resident", "streamed" or "split") and the tile sizes. Results agree to
    rounding."""
    require_triton()
    if x_gates.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x_gates: impl='triton' supports float32/bfloat16/float16, got {x_gates.dtype}")
    c0, n0, m0, y0 = (s.to(torch.float32).contiguous() for s in state)
    starts = None
    if document_starts is not None and bool(document_starts.any()):
        starts = document_starts.to(device=x_gates.device, dtype=torch.int8).contiguous()
    y, c, n, m, y_last = _SLSTMTriton.apply(x_gates, recurrent_weight, c0, n0, m0, y0, starts, launch)
    return y, (c, n, m, y_last)
