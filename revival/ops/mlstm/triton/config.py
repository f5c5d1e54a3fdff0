"""Settings of the Triton mLSTM kernels, passed as arguments: the precision preset and the launch config.

Both are pure functions of what the caller passes and of the shapes; no module state is read or written. Results do
not depend on the launch config beyond rounding; the precision preset changes rounding only (docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Matrix products whose operands are computed (decay-weighted scores, scaled gradients, states) can split those
# operands into hi + lo 16-bit parts (two or three products instead of one). One bit per product:
#   forward  1: state update k^T v   2: scores @ v   4: q @ C (entering state)
#   backward 8: dstate update q^T dnum   16: dnum @ v^T   32: dscores @ k   64: dnum @ C^T   128: dscores^T @ q
#            256: v @ dC^T   512: scores^T @ dnum   1024: k @ dC
# PRESETS name (split mask, float32 chunk states) for 16-bit inputs (float32 inputs never split: their products run
# in float32).
# "balanced" splits only the products that the initial state's gradient is sensitive to (the forward's outputs, through
# dh.h in the normalizer's gradient, and the state-gradient update): dm0 as accurate as "precise" (interpreter, 16
# seeds: 3.9e-3 vs 3.8e-3; "fast32" 9.4e-3, "fast" up to 1.6e-2 and 1.4e-2 on the GPU), at a fraction of its cost.
# "auto" (the default) picks per call: "balanced" when the initial state (C0, n0, m0) needs a gradient, else "fast"
# (16-bit chunk states, no splits). Only the initial state's gradient (dm0 above all: an inner product whose terms
# cancel) needs the splits; every other output and gradient of "fast" stays within a few 1e-3 of float64 on the GPU,
# and "fast" is ~20% faster (docs/kernels.md). Training from a zero or detached state takes "fast".
PRESETS = {"precise": (2047, True), "balanced": (2 | 4 | 8, True), "fast": (0, False), "fast32": (0, True)}
PRECISIONS = ("auto", *PRESETS)


def resolve_precision(precision: str, initial_state_grad: bool) -> str:
    """The preset (a PRESETS key) one call uses: "auto" -> "balanced" when the initial state needs a gradient, else
    "fast"; any other value is a preset name."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "balanced" if initial_state_grad else "fast"
    return precision


# Below this many programs (batch*head rows x state tiles) the sequential state kernels leave the GPU mostly idle and
# the chunk-parallel form, which moves every chunk's state two more times, is used instead (forward and backward
# alike). Measured on an H100 (132 SMs), forward ms sequential -> chunk-parallel: 24 programs (4 rows, Dk 96, Dv 192,
# T 32768) 1.49 -> 0.79; 64 (16 rows, 128 x 128, T 65536) 3.67 -> 3.28; 128 (32 rows, 128 x 128, T 32768)
# 2.50 -> 3.05 (docs/kernels.md).
SEQ_MIN_PROGRAMS = 100

# Above this value head dim the kernels use narrower tiles and two gradient launches
WIDE_DV = 256


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and warps of the Triton mLSTM kernels. A field left None takes its shape-keyed default
    (`launch_config`); pass e.g. `LaunchConfig(grad_fused=False)` to override one setting for every shape.

    block_k, block_v: the state tiles (Dk x Dv) of the state and state-gradient kernels; block_v_out / span_out: the
    Dv-tile of the output kernel and the Dv columns one program covers; block_v_grad / span_grad: the same for the
    gradient kernel; warps_*: num_warps per kernel; grad_fused: the gradient kernel in one launch (else two: the dq
    side, then the dk/dv side); seq_min_programs: below this many programs the state recurrences run chunk-parallel
    (0: never, a huge value: always); stabilizer_chunks: chunks per step of the stabilizer scan; scan_chunks,
    scan_elements: chunks per step and elements per program of the elementwise chunk scan; keep_states_max_ratio:
    the forward keeps the chunk states for the backward while they take at most this many times the bytes of q, k, v
    (else the backward recomputes them).
    """

    block_k: int | None = None
    block_v: int | None = None
    block_v_out: int | None = None
    span_out: int | None = None
    warps_states: int | None = None
    warps_out: int | None = None
    block_v_grad: int | None = None
    span_grad: int | None = None
    warps_dstates: int | None = None
    warps_grad: int | None = None
    grad_fused: bool | None = None
    seq_min_programs: int | None = None
    stabilizer_chunks: int | None = None
    scan_chunks: int | None = None
    scan_elements: int | None = None
    keep_states_max_ratio: float | None = None


def check_settings(precision, launch) -> None:
    """Raise ValueError unless `precision` is one of PRECISIONS and `launch` a LaunchConfig or None."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if launch is not None and not isinstance(launch, LaunchConfig):
        raise ValueError(f"launch: expected a LaunchConfig or None, got {type(launch).__name__}")


def _pow2(x: int, floor: int = 16) -> int:
    return max(floor, 1 << max(x - 1, 0).bit_length())


def odd_span(Dv: int) -> int | None:
    """For 128 < Dv < 256 not a power of two (xlstm-large at d_model 768: Dv = 192), the Dv columns one program of
    the output and gradient kernels covers, in 64-wide tiles: all of them (Dv rounded up to 64). The power-of-two
    shapes would take two 128-wide programs, the second part-empty, recomputing the chunk's scores (output) or
    splitting dq, dk into float32 partial sums (gradients). Measured on an H100 at (16, 4, T=2048, 96, 192):
    fwd+bwd 2.46 -> 2.24 ms; (1, 4, T=65536) forward 1.55 -> 1.37 ms (docs/kernels.md)."""
    if 128 < Dv < 256 and Dv & (Dv - 1):
        return -(-Dv // 64) * 64
    return None


def default_launch_config(Dk: int, Dv: int) -> LaunchConfig:
    """Fixed block sizes per shape class (no autotuning).

    Forward, measured on an H100 (docs/kernels.md): up to Dv 256, states at 4 warps and one 128-wide output tile beat
    8 warps and 64-wide tiles by 0.3-0.5 ms at (16, 128, 128); at Dv 512, one program over all of Dv in 32-wide tiles
    (the scores computed once, not four times), states at 4 warps: forward 10.4 -> 8.6 and 10.4 -> 7.9 ms at
    (8, 256, 512). The output kernel at 4 warps: forward 2.20 -> 1.81 ms at (16, 128, 128) and 6.2 -> 5.5 at
    (8, 256, 512); no gain for the odd spans (Dv 192), which keep 8.
    Backward: up to Dv 256, one launch of the gradient kernel with a 128-wide Dv-tile and dstates at 4 warps,
    5.1 ms fwd+bwd ("fast") at (16, 128, 128) against 6.9 ms with two launches of 32-wide tiles at 8 warps. Wider
    (Dv 512): the two launches, each program over all of Dv in 32-wide tiles (no float32 partial sums of dq, dk over
    Dv-spans), dstates at 4 warps: 31.3 -> 24.7 and 31.3 -> 28.3 ms fwd+bwd ("balanced", (8, 256, 512)). The kernels
    halve a tile that does not fit the chip (`forward.launch_with_fallback`).
    """
    wide = Dv > WIDE_DV
    config = dict(
        block_k=min(_pow2(Dk), 64), block_v=min(_pow2(Dv), 64),
        block_v_out=min(_pow2(Dv), 32 if wide else 128), span_out=_pow2(Dv) if wide else min(_pow2(Dv), 128),
        warps_states=4, warps_out=4,
        block_v_grad=min(_pow2(Dv), 32 if wide else 128), span_grad=_pow2(Dv) if wide else min(_pow2(Dv), 128),
        warps_dstates=4, warps_grad=8, grad_fused=not wide,
        seq_min_programs=SEQ_MIN_PROGRAMS, stabilizer_chunks=64, scan_chunks=8, scan_elements=256,
        # at Dk = Dv = 384, chunk 32, the chunk states would take 18 KB per token-head, 8x q, k and v: deep stacks
        # with large heads fit only when the backward recomputes them
        keep_states_max_ratio=4.0,
    )
    if odd_span(Dv):
        config.update(block_v_out=64, span_out=odd_span(Dv), warps_out=8, block_v_grad=64, span_grad=odd_span(Dv))
    return LaunchConfig(**config)


def launch_config(Dk: int, Dv: int, requested: LaunchConfig | None = None) -> LaunchConfig:
    """The launch config of one call: the fields `requested` sets, the shape-keyed defaults for the others."""
    default = default_launch_config(Dk, Dv)
    if requested is None:
        return default
    chosen = {f.name: getattr(requested, f.name) for f in dataclasses.fields(requested)}
    return dataclasses.replace(default, **{name: value for name, value in chosen.items() if value is not None})
