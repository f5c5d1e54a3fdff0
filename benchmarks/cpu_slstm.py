"""CPU timing of the sLSTM op: forward and forward+backward of each implementation.

    .venv/bin/python benchmarks/cpu_slstm.py [--repeats 5] [--threads N]

Implementations: "fused" (batched step + hand-written backward, what `impl="auto"` runs on CPU),
"fused-autograd" (the same batched step differentiated by autograd) and "reference" (plain loop + autograd).
Prints the best-of-N wall and process-CPU milliseconds per call (best-of is the least noisy statistic on a shared
machine; with --threads 1 the CPU time is close to the work done, whatever else runs on the machine).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from revival.ops.slstm import slstm
from revival.ops.slstm.fused import slstm_fused_autograd

SHAPES = [  # (B, T, H, d)
    (8, 256, 4, 64),  # xLSTM[3:1] small: embedding 256, 4 heads
    (16, 256, 1, 256),
]


def _run(impl: str, x: torch.Tensor, R: torch.Tensor):
    if impl == "fused-autograd":
        B, _, _, H, d = x.shape
        zeros = torch.zeros(B, H, d, dtype=x.dtype)
        return slstm_fused_autograd(x, R, (zeros, zeros, zeros, zeros))
    return slstm(x, R, impl=impl)


def _forward(impl: str, x: torch.Tensor, R: torch.Tensor) -> None:
    with torch.no_grad():
        _run(impl, x, R)


def _forward_backward(impl: str, x: torch.Tensor, R: torch.Tensor) -> None:
    xs, Rs = x.clone().requires_grad_(), R.clone().requires_grad_()
    y, _ = _run(impl, xs, Rs)
    y.sum().backward()


def _best_ms(fn, repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` wall time and process CPU time, in ms (CPU time is less sensitive to a busy machine)."""
    fn()  # warm-up
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall * 1e3, best_cpu * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--impls", default="fused,fused-autograd,reference")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}")
    torch.manual_seed(0)
    for B, T, H, d in SHAPES:
        x = torch.randn(B, T, 4, H, d)
        R = torch.randn(4, H, d, d) * d**-0.5
        for impl in args.impls.split(","):
            fwd = _best_ms(lambda impl=impl, x=x, R=R: _forward(impl, x, R), args.repeats)
            both = _best_ms(lambda impl=impl, x=x, R=R: _forward_backward(impl, x, R), args.repeats)
            print(
                f"B={B:3d} T={T} H={H} d={d:3d}  {impl:15s} fwd {fwd[0]:7.1f} ms (cpu {fwd[1]:7.1f})"
                f"   fwd+bwd {both[0]:7.1f} ms (cpu {both[1]:7.1f})"
            )


if __name__ == "__main__":
    main()
