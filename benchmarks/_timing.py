"""Timing helpers of the gpu_*.py benchmarks (import as `from _timing import ...`: the scripts run from this folder).

`event_ms` / `wall_ms`: milliseconds of one call (CUDA events: the GPU time of what it launches; wall: host time
with the device synchronised on both sides); `median_ms`: the median of repeated calls after a warm-up;
`do_bench_ms`: Triton's do_bench median; `graphed_ms`: the same for a call replayed from a CUDA graph."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: str) -> None:
    """Wait for the queued work of `device` ("cuda"; nothing to wait for elsewhere)."""
    if device == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, device: str) -> float:
    """Host milliseconds of one call of fn, `device` synchronised before and after (launch overhead included)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def event_ms(fn, device: str) -> float:
    """Milliseconds of one call of fn: between two CUDA events on "cuda", wall time elsewhere."""
    if device != "cuda":
        return wall_ms(fn, device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end)


def median_ms(fn, device: str, reps: int, clock=event_ms) -> float:
    """Median of `reps` calls of fn timed by `clock` (event_ms or wall_ms), after one warm-up call."""
    if reps < 1:
        raise ValueError(f"reps: expected an int >= 1, got {reps!r}")
    fn()
    return statistics.median(clock(fn, device) for _ in range(reps))


def do_bench_ms(fn, grads=None, rep: int = 200) -> float:
    """Triton's do_bench median in ms (25 ms of warm-up, `rep` ms of timed calls; the gradients of `grads` reset
    between calls). CUDA only."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep, grad_to_none=grads, return_mode="median")


def graphed_ms(fn) -> float:
    """`do_bench_ms` of fn replayed from a CUDA graph: the GPU time alone, without the host's launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench_ms(graph.replay)
