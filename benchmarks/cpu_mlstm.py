"""CPU benchmark: forward + backward of `revival.ops.mlstm(impl="chunkwise")` against the official kernel.

The official kernel is `mlstm_kernels==2.0.6` `chunkwise--native_autograd` (pure PyTorch, autograd backward). It is
never a dependency of revival: install it in a separate environment to run the comparison, e.g.

    python3 -m venv .cache/bench-venv
    .cache/bench-venv/bin/pip install torch==2.13.0 && .cache/bench-venv/bin/pip install -e .
    .cache/bench-venv/bin/pip install --no-deps mlstm_kernels==2.0.6 einops
    .cache/bench-venv/bin/python benchmarks/cpu_mlstm.py

Without it the script times revival alone and records the official kernel as "not installed". Both are timed side
by side in one run: each repetition times every (length, implementation) once, in alternating order, and the median
over repetitions is reported (other processes on the machine slow both alike). Writes
benchmarks/results/cpu_mlstm.json (device, versions, every timing, medians, ratios, output agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from revival.ops import mlstm  # noqa: E402

CONVENTIONS = (
    "Same math on both sides: q scaled by Dk**-0.5 (the official kernel applies qk_scale to q.k^T and to q against "
    "the state; revival scales q once), sigmoid forget in log space, exponential input gate, stabilizer m started at "
    "0, eps = 1e-6 added after max(|q.n|, exp(-m)). Official takes m_initial as (B, H, 1) and returns the last "
    "states only on request (return_last_states=True, used here so both do the same work); revival always returns "
    "them, m as (B, H). Official needs T % chunk_size == 0 (true here); revival does not."
)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_official():
    """The official chunkwise native-autograd kernel and its version, or (None, reason)."""
    try:
        import mlstm_kernels
        from mlstm_kernels.torch import get_mlstm_kernel

        return get_mlstm_kernel("chunkwise--native_autograd"), mlstm_kernels.__version__
    except ImportError as error:
        return None, f"not installed ({error})"


def make_inputs(T: int, B: int, H: int, D: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    i = torch.randn(B, H, T, generator=gen)
    f = 3.0 + torch.randn(B, H, T, generator=gen)
    grad_h = torch.randn(B, H, T, D, generator=gen)
    return [x.requires_grad_(True) for x in (q, k, v, i, f)], grad_h


def revival_fn(chunk_size: int):
    def run(q, k, v, i, f):
        h, _ = mlstm(q, k, v, i, f, impl="chunkwise", chunk_size=chunk_size)
        return h

    return run


def official_fn(kernel, chunk_size: int):
    def run(q, k, v, i, f):
        h, _ = kernel(q, k, v, i, f, return_last_states=True, chunk_size=chunk_size, eps=1e-6)
        return h

    return run


def forward_backward(fn, inputs, grad_h, clock=time.perf_counter) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """One timed forward + backward; returns (seconds, h, input gradients)."""
    for x in inputs:
        x.grad = None
    start = clock()
    h = fn(*inputs)
    h.backward(grad_h)
    seconds = clock() - start
    return seconds, h.detach(), [x.grad for x in inputs]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_fn(q, k, v, i, f):
    return mlstm(q, k, v, i, f, impl="parallel")[0]


def agreement(fns: dict, T: int, B: int, H: int, D: int) -> dict:
    """Relative errors of h and of the input gradients: each float32 kernel against the float64 parallel form."""
    inputs, grad_h = make_inputs(T, B, H, D, seed=1)
    inputs64 = [x.detach().double().requires_grad_(True) for x in inputs]
    _, h64, grads64 = forward_backward(reference_fn, inputs64, grad_h.double())
    result = {}
    for name, fn in fns.items():
        _, h, grads = forward_backward(fn, inputs, grad_h)
        errors = {f"d{x}": rel_err(g, g64) for x, g, g64 in zip("qkvif", grads, grads64)}
        result[name] = {"h": rel_err(h, h64), **errors}
    if len(fns) == 2:
        (_, a), (_, b) = fns.items()
        _, ha, _ = forward_backward(a, inputs, grad_h)
        _, hb, _ = forward_backward(b, inputs, grad_h)
        result["revival_vs_official_h"] = rel_err(ha, hb)
    return result


# Modes: (clock, threads, order). "wall": wall-clock time with --threads torch threads (the measure).
# "cpu_1thread": CPU time of the calling thread with one torch thread, which other processes on a shared machine
# barely disturb (a descheduled thread accrues none; with several threads, wall-clock time suffers badly from
# oversubscription). Order "interleaved": each repeat times every (length, kernel) once, alternating the kernel
# order (fair under drifting load; each run starts with caches full of the other kernel's data). Order "blocked":
# all repeats of one (length, kernel) in a row (the steady state of a loop calling one kernel).
MODES = {
    "wall": (time.perf_counter, "threads", "interleaved"),
    "wall_blocked": (time.perf_counter, "threads", "blocked"),
    "cpu_1thread": (time.thread_time, 1, "interleaved"),
}


def measure(fns: dict, inputs: dict, clock, repeats: int, warmup: int, order: str) -> dict:
    """{T: {name: [ms, ...]}} of forward + backward, in the given order ("interleaved" or "blocked")."""
    timings = {T: {name: [] for name in fns} for T in inputs}
    if order == "blocked":
        for T in inputs:
            for name, fn in fns.items():
                for repeat in range(warmup + repeats):
                    seconds = forward_backward(fn, *inputs[T], clock=clock)[0]
                    if repeat >= warmup:
                        timings[T][name].append(seconds * 1e3)
        return timings
    for T in inputs:
        for _ in range(warmup):
            for fn in fns.values():
                forward_backward(fn, *inputs[T])
    for repeat in range(repeats):
        for T in inputs:
            kernels = list(fns.items()) if repeat % 2 == 0 else list(fns.items())[::-1]
            for name, fn in kernels:
                timings[T][name].append(forward_backward(fn, *inputs[T], clock=clock)[0] * 1e3)
    return timings


def summarize(timings: dict, mode: str) -> dict:
    """Medians, minima, speedups (official / revival) per length and the long/short scaling per kernel."""
    results = {}
    for T, per_kernel in timings.items():
        medians = {name: statistics.median(ms) for name, ms in per_kernel.items()}
        entry = {f"{name}_ms_median": round(ms, 3) for name, ms in medians.items()}
        entry.update({f"{name}_ms_min": round(min(ms), 3) for name, ms in per_kernel.items()})
        if "official" in medians:
            entry["speedup_official_over_revival"] = round(medians["official"] / medians["revival"], 3)
        entry["timings_ms"] = {name: [round(x, 3) for x in ms] for name, ms in per_kernel.items()}
        results[str(T)] = entry
        line = "  ".join(f"{name} {ms:8.2f} ms" for name, ms in medians.items())
        speedup = f"speedup {entry['speedup_official_over_revival']:.2f}x" if "official" in medians else ""
        print(f"[{mode}] T={T:5d}  median {line}  {speedup}")
    lengths = sorted(timings)
    if len(lengths) >= 2:
        short, long = lengths[0], lengths[-1]
        results["scaling"] = {
            f"{name}_T{long}_over_T{short}": round(
                results[str(long)][f"{name}_ms_median"] / results[str(short)][f"{name}_ms_median"], 3
            )
            for name in timings[short]
        }
        print(f"[{mode}] scaling:", results["scaling"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the wall-clock mode")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--chunk-size", type=int, default=64, help="revival's chunk size")
    parser.add_argument("--official-chunk-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_mlstm.json")
    args = parser.parse_args()

    B, H, D = 1, 4, 64
    kernel, official_version = load_official()
    fns = {"revival": revival_fn(args.chunk_size)}
    if kernel is not None:
        fns["official"] = official_fn(kernel, args.official_chunk_size)
    load_before = os.getloadavg()
    inputs = {T: make_inputs(T, B, H, D, seed=0) for T in args.lengths}
    results = {}
    for mode in args.modes:
        clock, threads, order = MODES[mode]
        torch.set_num_threads(args.threads if threads == "threads" else threads)
        results[mode] = {"torch_threads": torch.get_num_threads(), "order": order, "load_average_before": _load()}
        results[mode].update(summarize(measure(fns, inputs, clock, args.repeats, args.warmup, order), mode))
        results[mode]["load_average_after"] = _load()
    torch.set_num_threads(args.threads)

    report = {
        "benchmark": "mLSTM chunkwise forward+backward, float32, CPU",
        "shape": {"B": B, "H": H, "Dk": D, "Dv": D, "lengths": args.lengths},
        "chunk_size": {"revival": args.chunk_size, "official": args.official_chunk_size},
        "device": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads_wall_mode": args.threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": _load(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "mlstm_kernels": official_version,
        },
        "method": f"median of {args.repeats} repeats after {args.warmup} warm-up runs of forward + "
        "backward(grad_h) of h. Modes: 'wall' = wall-clock, the given torch threads, interleaved (each repeat times "
        "every (length, kernel) once, alternating the kernel order); 'wall_blocked' = the same, all repeats of one "
        "(length, kernel) in a row; 'cpu_1thread' = CPU time of the calling thread with 1 torch thread, interleaved "
        "(robust to other processes on a shared machine).",
        "conventions": CONVENTIONS,
        "results": results,
        "agreement_T1024_rel_err_vs_float64": agreement(fns, 1024, B, H, D),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print("agreement:", json.dumps(report["agreement_T1024_rel_err_vs_float64"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
