"""GPU benchmark of the parallel Newton solver (revival.ops.newton) against the sequential loops of the same cells.

Run on a CUDA machine (one process, a few minutes on an H200):
    python benchmarks/gpu_newton.py --out "$OUT"          (default: $OUT, else runs/)
Writes gpu_newton.json. For each cell, forward+backward (CUDA events, median) at B=16 and T = 1k / 4k / 16k:
- ParaGRU / ParaLSTM (hidden 512, 1024): Newton ("deer": fused Triton step per iteration, adjoint scan backward)
  vs the same cell's PyTorch sequential loop (autograd), plus the minGRU scan (`mingru_scan`, Triton) as the
  linear-recurrence baseline; Newton iterations to converge; the 3-iteration setting of ParaRNN (residual and
  max |h_3 - h| after 3 iterations).
- sLSTM (hidden 512 as 32 heads x 16 and 8 heads x 64): `slstm(impl="newton")` (full 3d x 3d Jacobians per head)
  and the "quasi" solve vs revival's fused sequential Triton kernel (`impl="triton"`) and the PyTorch step loop
  (`impl="fused"`); out-of-memory is recorded, not hidden (the full Jacobians take B T H (3d)^2 floats).
- a dense GRU through DEER (d = 64; torch.func Jacobians) vs its loop.
Every Newton result is checked against the loop (max |difference| recorded). `--smoke` runs tiny shapes anywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
from _timing import median_ms, wall_ms

from revival.ops import mingru_scan, slstm
from revival.ops.newton import DENSE_GRU, PARAGRU, PARALSTM, SLSTM, newton_solve, sequential_solve
from revival.ops.newton.slstm import slstm_state_to_newton

B = 16


def time_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms (one warm-up call); CUDA-synchronised."""
    return median_ms(fn, "cuda" if torch.cuda.is_available() else "cpu", reps, clock=wall_ms)


def guarded(fn):
    """Run fn; an out-of-memory error becomes a record instead of a crash."""
    try:
        return fn()
    except torch.OutOfMemoryError as error:
        torch.cuda.empty_cache()
        return {"status": "out of memory", "error": str(error).splitlines()[0]}


def pararnn_problem(cell, T, N, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, 3, N, generator=g).to(device)
    a = (torch.rand(3, N, generator=g) - 0.5).to(device)
    if cell is PARAGRU:
        x[:, :, 0] -= 2.0  # update gates mostly closed: long memory, as the layer's initialisation
        return x, torch.zeros(B, N, device=device), (a,)
    x[:, :, 0] += 2.0  # forget gates mostly open
    return x, torch.zeros(B, N, 2, device=device), (a, (torch.rand(2, N, generator=g) * 0.2 - 0.1).to(device))


def fwd_bwd(solve, x, weights):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]

    def run():
        for t in leaves:
            t.grad = None
        h = solve(leaves[0], tuple(leaves[1:]))
        h.float().square().mean().backward()
        return h

    return run


def bench_pararnn(cell, T, N, device, reps, seq_max_T):
    x, h0, weights = pararnn_problem(cell, T, N, device)
    entry = {"cell": cell.name, "B": B, "T": T, "hidden": N}
    h, result = newton_solve(cell, x, h0, weights)
    entry["newton_iterations"], entry["newton_residual"] = result.iterations, result.residual
    h3, r3 = newton_solve(cell, x, h0, weights, max_iters=3, on_failure="return")
    entry["three_iterations"] = {"residual": r3.residual, "max_abs_diff_to_converged": float((h3 - h).abs().max())}
    entry["newton_fwd_bwd_ms"] = time_ms(fwd_bwd(lambda x, w: newton_solve(cell, x, h0, w)[0], x, weights), reps)
    entry["newton_fwd_ms"] = time_ms(lambda: newton_solve(cell, x, h0, weights), reps)
    xb = x.bfloat16()
    entry["newton_bf16_inputs_fwd_ms"] = time_ms(lambda: newton_solve(cell, xb, h0, weights), reps)
    if T <= seq_max_T:
        seq = fwd_bwd(lambda x, w: sequential_solve(cell, x, h0, w), x, weights)
        entry["sequential_fwd_bwd_ms"] = time_ms(seq, 1 if T > 2048 else reps)
        with torch.no_grad():
            want = sequential_solve(cell, x, h0, weights)
        entry["max_abs_diff_to_sequential"] = float((h - want).abs().max())
        entry["speedup_fwd_bwd"] = entry["sequential_fwd_bwd_ms"] / entry["newton_fwd_bwd_ms"]
    gate, hidden = x[:, :, 0].contiguous(), x[:, :, 2].contiguous()
    entry["mingru_scan_fwd_bwd_ms"] = time_ms(
        fwd_bwd(lambda gt, w: mingru_scan(gt, w[0], None, impl="auto")[0], gate, (hidden,)), reps)
    return entry


def bench_slstm(T, H, d, device, reps, seq_max_T):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(B, T, 4, H, d, generator=g).to(device)
    x[:, :, 1] += 3.0
    R = (torch.randn(4, H, d, d, generator=g) * 0.5 * d**-0.5).to(device)
    entry = {"cell": "slstm", "B": B, "T": T, "heads": H, "head_dim": d}

    def newton(method):
        def run():
            zeros = torch.zeros(B, H, d, device=device)
            h, result = newton_solve(SLSTM, x, slstm_state_to_newton((zeros,) * 4), (R,), method=method,
                                     on_failure="return")
            return {"iterations": result.iterations, "residual": result.residual, "converged": result.converged,
                    "y": h[..., 2 * d:]}
        return run

    impls = {"triton": "triton_sequential_kernel", "fused": "pytorch_step_loop"}
    if device != "cuda":
        del impls["triton"]
    reference = None
    for impl, name in impls.items():
        if impl == "fused" and T > seq_max_T:
            continue
        entry[f"{name}_fwd_bwd_ms"] = time_ms(
            fwd_bwd(lambda x, w, impl=impl: slstm(x, w[0], impl=impl)[0], x, (R,)), 1 if impl == "fused" else reps)
        if reference is None:
            with torch.no_grad():
                reference = slstm(x, R, impl=impl)[0]
    for method in ("deer", "quasi"):
        def record(method=method):
            info = newton(method)()
            out = {k: v for k, v in info.items() if k != "y"}
            out["max_abs_diff_to_sequential"] = float((info["y"] - reference).abs().max())
            out["fwd_ms"] = time_ms(newton(method), reps)
            out["fwd_bwd_ms"] = time_ms(fwd_bwd(lambda x, w: slstm(x, w[0], impl="newton")[0], x, (R,)), reps) \
                if method == "deer" else None
            return out
        entry[f"newton_{method}"] = guarded(record)
    return entry


def bench_dense_gru(T, d, device, reps):
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(B, T, 3, d, generator=g).to(device)
    weights = ((torch.randn(3, d, d, generator=g) * d**-0.5).to(device), torch.zeros(d, device=device))
    h0 = torch.zeros(B, 1, d, device=device)
    entry = {"cell": "dense_gru", "B": B, "T": T, "hidden": d}

    def record():
        h, result = newton_solve(DENSE_GRU, x, h0, weights, on_failure="return")
        with torch.no_grad():
            want = sequential_solve(DENSE_GRU, x, h0, weights)
        return {"iterations": result.iterations, "converged": result.converged,
                "max_abs_diff_to_sequential": float((h - want).abs().max()),
                "newton_fwd_bwd_ms": time_ms(fwd_bwd(lambda x, w: newton_solve(DENSE_GRU, x, h0, w)[0], x, weights),
                                             reps),
                "sequential_fwd_bwd_ms": time_ms(fwd_bwd(lambda x, w: sequential_solve(DENSE_GRU, x, h0, w), x,
                                                         weights), 1)}
    entry.update(guarded(record))
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the script")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sections", default="pararnn,slstm,dense_gru",
                        help="comma-separated subset of pararnn, slstm, dense_gru")
    parser.add_argument("--slstm-lengths", default="1024,4096",
                        help="sequence lengths of the sLSTM rows (16k: the full Jacobians do not fit)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"pararnn", "slstm", "dense_gru"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; expected a subset of pararnn, slstm, dense_gru")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        lengths, hiddens, slstm_heads, seq_max_T, dense = [64], [32], [(4, 8)], 64, [(32, 8)]
    else:
        lengths, hiddens, slstm_heads, seq_max_T = [1024, 4096, 16384], [512, 1024], [(32, 16), (8, 64)], 4096
        dense = [(1024, 64), (4096, 64)]
    started = time.time()
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "B": B, "sections": sorted(sections), "pararnn": [], "slstm": [], "dense_gru": []}
    for cell in (PARAGRU, PARALSTM) if "pararnn" in sections else ():
        for N in hiddens:
            for T in lengths:
                entry = guarded(functools.partial(bench_pararnn, cell, T, N, device, args.reps, seq_max_T))
                results["pararnn"].append(entry)
                print(json.dumps(entry), flush=True)
    slstm_lengths = lengths if args.smoke else [int(n) for n in args.slstm_lengths.split(",")]
    for H, d in slstm_heads if "slstm" in sections else ():
        for T in slstm_lengths:
            entry = guarded(functools.partial(bench_slstm, T, H, d, device, args.reps, seq_max_T))
            results["slstm"].append(entry)
            print(json.dumps(entry), flush=True)
    for T, d in dense if "dense_gru" in sections else ():
        entry = bench_dense_gru(T, d, device, args.reps)
        results["dense_gru"].append(entry)
        print(json.dumps(entry), flush=True)
    results["wall_s"] = time.time() - started
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_newton.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {path} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
