"""Launch settings of the Triton gated delta rule kernels, passed as an argument (no module state)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..._triton import merged_launch_config


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and warps; a field left None takes its shape- and dtype-keyed default (`launch_config`).

    block_v_states / block_v_output / block_v_dstates / block_v_du: the Dv-tile of the sequential state kernel, the
    output kernel, the sequential state-gradient kernel and the chunk-local dU kernel before it (narrower tiles: more
    programs for the sequential walks); block_v_wy / block_v_grads: the Dv-tile the WY and the two gradient kernels
    loop over (fewer live tiles); warps_*: num_warps per kernel (warps_grads both gradient kernels, warps_du the
    chunk-local dU kernel); stages_grads / stages_dstates: num_stages of the gradient and state-gradient kernels
    (None for the latter: Triton's default); segments: how many parts of the sequence the two sequential walks take
    at once (forward.py's `segmented_walk`; 1: one walk); inverse_block: the diagonal blocks of the WY inverse's
    substitution (forward.py's `unit_triangular_inverse`; >= the chunk size: one block, plain forward
    substitution)."""

    block_v_wy: int | None = None
    block_v_grads: int | None = None
    block_v_states: int | None = None
    block_v_output: int | None = None
    block_v_dstates: int | None = None
    block_v_du: int | None = None
    warps_wy: int | None = None
    warps_states: int | None = None
    warps_output: int | None = None
    warps_dstates: int | None = None
    warps_du: int | None = None
    warps_grads: int | None = None
    stages_grads: int | None = None
    stages_dstates: int | None = None
    segments: int | None = None
    inverse_block: int | None = None


def default_segments(rows: int, chunks: int) -> int:
    """Segments of the sequential walks: 1 while batch*heads fill the GPU (rows >= 64: the 2k training shapes),
    else enough that rows x segments reaches ~128 programs' rows, each segment at least 16 chunks long (a segmented
    walk does ~2.5 walks of work, so it pays only where rows alone leave SMs idle)."""
    if rows >= 64:
        return 1
    return max(1, min(128 // rows, chunks // 16))


def default_launch_config(Dk: int, Dv: int, rows: int, dtype: torch.dtype, chunks: int = 1) -> LaunchConfig:
    """Fixed settings per shape class and kernel dtype (no autotuning): with few batch*head rows the sequential
    walks run in segments (`default_segments`) and, still with few rows, split Dv into narrower tiles so that more
    programs run at once; float32 at Dk > 64 takes smaller shared-memory footprints (below)."""
    segments = default_segments(rows, chunks)
    rows *= segments  # the walks' programs per column tile
    narrow = 32 if rows < 64 else 64
    # the state-gradient walk at 8 warps with few rows: at (128, 256) bf16 and 32-wide tiles 220 registers and no
    # spills against 255 and 176 bytes at 4 warps, and one program per SM either way (shared memory)
    warps_dstates = 8 if rows < 64 else 4
    # the two gradient kernels pipelined at 16-bit Dk <= 128 (sm_90 at (128, 256), Dv-tile 32: 112 / 116 KB of shared
    # memory, no spills; fwd+bwd 6.38 -> 5.95 ms at the 125M shape); wider keys or float32 unpipelined (227 KB)
    stages_grads = 2 if dtype in (torch.bfloat16, torch.float16) and Dk <= 128 else 1
    # Dv-tile 32: fewer spills than 64 at Dk = 128 (the probe)
    cfg = LaunchConfig(block_v_wy=128, block_v_grads=32, block_v_states=narrow, block_v_output=128,
                       block_v_dstates=narrow, block_v_du=128, warps_wy=4, warps_states=4, warps_output=4,
                       warps_dstates=warps_dstates, warps_du=4, warps_grads=8, stages_grads=stages_grads,
                       segments=segments, inverse_block=16)
    if dtype == torch.float32 and Dk > 64:
        # three-pass tf32 keeps a high and a low copy of every product operand in shared memory; at (Dk, Dv) =
        # (128, 128) for sm_90 (227 KB) the state-gradient kernel pipelined needs 280+ KB at any Dv-tile (96 KB
        # unpipelined); states / output at 64- / 128-wide tiles 225 / 192 KB (177 / 128 KB at 32 / 64). The split
        # gradient kernels fit holding their inputs (96 KB each)
        cfg = replace(cfg, block_v_states=32, block_v_output=64, stages_dstates=1)
    return cfg


def wide_block_v(block_v: int, BV: int) -> int:
    """The Dv-tile of the two gradient kernels and of the state-gradient walk: the config's, at most `BV` (Dv padded
    to a power of two), at least 32 (masks cover Dv < 32). 16-wide tiles faulted on the H200 (Triton 3.6), though the
    interpreter computes them right: `_wy_grads_kernel` read shared memory out of bounds at float32, chunk 64, 8 warps
    (K = 16 operands in 64-byte-swizzled shared memory), and `_dstates_kernel` at bf16 (Dk, Dv) = (128, 256) took an
    illegal address (docs/kernels.md)."""
    return max(32, min(block_v, BV))


def launch_config(Dk: int, Dv: int, rows: int, dtype: torch.dtype, requested: LaunchConfig | None = None,
                  chunks: int = 1) -> LaunchConfig:
    """The launch config of one call (`dtype`: the kernels' q, k, v dtype; `chunks`: chunks per sequence): the fields
    `requested` sets, the shape- and dtype-keyed defaults for the others."""
    cfg = merged_launch_config(requested, default_launch_config(Dk, Dv, rows, dtype, chunks))
    if not (isinstance(cfg.segments, int) and cfg.segments >= 1):
        raise ValueError(f"launch.segments: expected an integer >= 1, got {cfg.segments!r}")
    block = cfg.inverse_block
    if not (isinstance(block, int) and block >= 16 and block & (block - 1) == 0):
        raise ValueError(f"launch.inverse_block: expected a power of two >= 16, got {block!r}")
    return cfg
