"""Launch settings of the Triton SSD kernels, passed as an argument (no module state)."""

from __future__ import annotations

from dataclasses import dataclass

from ..._triton import merged_launch_config


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and warps; a field left None takes its shape-keyed default (`launch_config`).

    block_p_states / block_p_output / block_p_dstates / block_p_dx: the P-tile (head dim) of the sequential state
    kernel, the output kernel, the sequential state-gradient kernel and the dx kernel (narrower tiles: more programs
    for the sequential walks); block_p_grads: the P-tile the dB and dC kernels loop over (fewer live tiles);
    warps_*: num_warps per kernel (warps_grads: the dB and dC kernels); segments: how many segments of chunks the
    forward state walk and the backward state-gradient walk each split into, walked side by side and joined by a
    sequential pass over the segments (None: `default_segments`; 1: one sequential walk)."""

    block_p_grads: int | None = None
    block_n_grads: int | None = None
    block_p_states: int | None = None
    block_p_output: int | None = None
    block_p_dstates: int | None = None
    block_p_dx: int | None = None
    warps_states: int | None = None
    warps_output: int | None = None
    warps_dstates: int | None = None
    warps_dx: int | None = None
    warps_grads: int | None = None
    segments: int | None = None


def default_launch_config(P: int, N: int, rows: int) -> LaunchConfig:
    """Fixed settings per shape class (no autotuning): with few batch*head rows the sequential kernels split P
    into narrower tiles so that more programs run at once; the dB / dC kernels take (P 32, N 32) tiles at 2 warps:
    four programs per SM at ~700 bytes of spills, the fastest on the H200 (SSD fwd+bwd at the 125M shape 5.05 ms;
    (P 16, N 32, 8 warps), one program per SM without spills, 8.44; benchmarks/results/gpu_sibling_launch_ssd.json)."""
    narrow = 16 if rows < 64 else 32
    return LaunchConfig(block_p_grads=32, block_n_grads=32, block_p_states=narrow, block_p_output=128,
                        block_p_dstates=narrow, block_p_dx=128, warps_states=4, warps_output=4, warps_dstates=4,
                        warps_dx=4, warps_grads=2)


def default_segments(rows: int, NC: int) -> int:
    """Segments of the walks over NC chunks for `rows` batch*heads: 1 from 64 rows (the 125M shape at 2k context has
    384: the chip is full), else 128 // rows (batch*heads*segments ~ 96-128 programs per P-tile), at most NC // 16
    (segments of at least ~16 chunks: the carry pass walks the segments one by one), at
    least 1. At 32k context, batch 1, 24 heads: 5 segments of ~103 chunks."""
    if rows >= 64:
        return 1
    return max(1, min(128 // rows, NC // 16))


def launch_config(P: int, N: int, rows: int, requested: LaunchConfig | None = None) -> LaunchConfig:
    """The launch config of one call: the fields `requested` sets, the shape-keyed defaults for the others
    (segments stays None, resolved per chunk count by `forward.walk_segments`)."""
    cfg = merged_launch_config(requested, default_launch_config(P, N, rows))
    if cfg.segments is not None and (isinstance(cfg.segments, bool) or not isinstance(cfg.segments, int)
                                     or cfg.segments < 1):
        raise ValueError(f"launch.segments: expected an int >= 1 or None, got {cfg.segments!r}")
    return cfg
