"""GPU benchmark of revival's Triton sLSTM kernel against the PyTorch step loop (`impl="fused"`).

Run on a CUDA machine:  python benchmarks/gpu_slstm.py --out benchmarks/results
It (1) checks `impl="triton"` (float32 and bfloat16 inputs) against the float64 step loop at the benchmark shapes:
outputs, final states and the gradients of x_gates, recurrent_weight and the initial state, (2) times forward and
forward+backward (CUDA events, medians) of the Triton kernel and of the PyTorch step loop, and writes gpu_slstm.json
and gpu_slstm.png, (3) sweeps the kernel's launch settings (weights resident, streamed or split over programs;
warps), and (4) times the official `xlstm` 2.0.6 CUDA sLSTM (`sLSTMCell`, backend "cuda", bf16; compiled by its
own per-configuration JIT step) in a subprocess per shape, so that a failed compile or a crash is recorded as such.
`--smoke` runs tiny shapes on any device (CPU: under TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from _timing import median_ms

SHAPES = [(16, 2048, 4, 128), (16, 2048, 8, 64), (16, 2048, 4, 192)]  # B, T, H, d (the last: xLSTM 125M's sLSTM)
SMOKE_SHAPES = [(2, 8, 2, 16)]
NAMES = ("y", "c", "n", "m", "y_last", "dx", "dR", "dc0", "dn0", "dm0", "dy0")


def make_inputs(B, T, H, d, device, seed=0):
    """float64 x_gates, R (scaled like a trained layer: |R y| of order 1) and a random initial state (n > 0)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, T, 4, H, d, generator=g, dtype=torch.float64)
    x[:, :, 1] += 3.0  # forget gates mostly open, as with the power-law forget bias
    R = torch.randn(4, H, d, d, generator=g, dtype=torch.float64) * 0.5 * d**-0.5
    state = (torch.randn(B, H, d, generator=g, dtype=torch.float64), torch.rand(B, H, d, generator=g,
             dtype=torch.float64) + 0.5, torch.randn(B, H, d, generator=g, dtype=torch.float64),
             torch.randn(B, H, d, generator=g, dtype=torch.float64))  # fmt: skip
    weights = [torch.randn(B, T, H, d, generator=g, dtype=torch.float64)] + [
        torch.randn(B, H, d, generator=g, dtype=torch.float64) for _ in range(4)
    ]
    move = lambda t: t.to(device)  # noqa: E731
    return move(x), move(R), tuple(map(move, state)), [move(w) for w in weights]


def outputs_and_grads(impl, x, R, state, weights, dtype):
    from revival.ops.slstm import slstm

    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [x.to(dtype), R.to(state_dtype), *(s.to(state_dtype) for s in state)]
    leaves = [t.clone().requires_grad_() for t in leaves]
    y, final = slstm(leaves[0], leaves[1], tuple(leaves[2:]), impl=impl)
    loss = sum((o.double() * w).sum() for o, w in zip((y, *final), weights))
    loss.backward()
    return [o.detach().double() for o in (y, *final)] + [t.grad.double() for t in leaves]


def check(shape, device):
    x, R, state, weights = make_inputs(*shape, device)
    ref = outputs_and_grads("fused", x, R, state, weights, torch.float64)
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        xr = x.to(dtype).double()  # the reference sees the same rounded inputs
        ref_d = ref if dtype == torch.float32 else outputs_and_grads("fused", xr, R, state, weights, torch.float64)
        try:
            got = outputs_and_grads("triton", xr, R, state, weights, dtype)
        except Exception as error:  # recorded, so that the other shapes and the timings still run
            result[str(dtype).replace("torch.", "")] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            continue
        errs = {n: ((a - b).norm() / b.norm().clamp_min(1e-300)).item() for n, a, b in zip(NAMES, got, ref_d)}
        errs["finite"] = all(bool(torch.isfinite(a).all()) for a in got)
        result[str(dtype).replace("torch.", "")] = errs
    return result


def timings(shape, device, reps):
    from revival.ops.slstm import slstm

    B, T, H, d = shape
    out = {}
    for impl, dtype in (("triton", torch.bfloat16), ("triton", torch.float32), ("fused", torch.float32)):
        g = torch.Generator(device="cpu").manual_seed(1)
        x = (torch.randn(B, T, 4, H, d, generator=g) + torch.tensor([0.0, 3.0, 0.0, 0.0])[:, None, None]).to(device)
        x = x.to(dtype).requires_grad_()
        R = (torch.randn(4, H, d, d, generator=g) * 0.5 * d**-0.5).to(device).requires_grad_()
        dy = torch.randn(B, T, H, d, generator=g).to(device, dtype)

        def fwd(x=x, R=R, impl=impl):
            with torch.no_grad():
                slstm(x, R, impl=impl)

        def fwd_bwd(x=x, R=R, dy=dy, impl=impl):
            x.grad = R.grad = None
            y, _ = slstm(x, R, impl=impl)
            y.backward(dy)

        n = reps if impl == "triton" else max(2, reps // 5)
        key = f"{impl}_{str(dtype).replace('torch.', '')}"
        try:
            out[key] = {"fwd_ms": median_ms(fwd, device, n), "fwd_bwd_ms": median_ms(fwd_bwd, device, n)}
        except Exception as error:
            out[key] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            continue
        out[key]["fwd_bwd_tokens_per_s"] = B * T / out[key]["fwd_bwd_ms"] * 1e3
    loop = out["fused_float32"]["fwd_bwd_ms"]
    for key in ("triton_bfloat16", "triton_float32"):
        if "fwd_bwd_ms" in out[key]:
            out[key]["speedup_vs_loop_fwd_bwd"] = loop / out[key]["fwd_bwd_ms"]
    return out


def sweep(shape, device, reps):
    """Forward+backward ms (bf16) of the Triton kernel for each launch setting (weight mode, warps, tiles)."""
    from revival.ops.slstm.triton import LaunchConfig, slstm_triton

    B, T, H, d = shape
    g = torch.Generator(device="cpu").manual_seed(2)
    x = (torch.randn(B, T, 4, H, d, generator=g) + torch.tensor([0.0, 3.0, 0.0, 0.0])[:, None, None]).to(device)
    x = x.to(torch.bfloat16).requires_grad_()
    R = (torch.randn(4, H, d, d, generator=g) * 0.5 * d**-0.5).to(device).requires_grad_()
    dy = torch.randn(B, T, H, d, generator=g).to(device, torch.bfloat16)
    state = tuple(torch.zeros(B, H, d, device=device) for _ in range(4))
    out = {}
    settings = [("resident", {"num_warps": w}) for w in (4, 8)]
    settings += [("streamed", {"num_warps": 8, "block_k": k}) for k in (32, 64)]
    settings += [("split", {"num_warps": w, "split_units": u}) for w in (4, 8) for u in (32, 64) if u < d]
    for mode, launch in settings:
        config = LaunchConfig(weights=mode, **launch)

        def fwd_bwd(config=config):
            x.grad = R.grad = None
            y, _ = slstm_triton(x, R, state, launch=config)
            y.backward(dy)

        key = mode + "," + ",".join(f"{k}={v}" for k, v in launch.items())
        try:
            out[key] = median_ms(fwd_bwd, device, reps)
        except Exception as error:  # a setting that does not compile (registers, shared memory) is recorded
            out[key] = f"failed: {type(error).__name__}: {str(error)[:200]}"
    return out


OFFICIAL_SCRIPT = r"""
import json, sys, time, torch
from xlstm.blocks.slstm.cell import sLSTMCell, sLSTMCellConfig
B, T, H, d, reps = map(int, sys.argv[1:6])
sys.path.insert(0, sys.argv[6])  # the benchmarks folder
from _timing import median_ms
t0 = time.perf_counter()
config = sLSTMCellConfig(hidden_size=H * d, num_heads=H, batch_size=B, backend="cuda", dtype="bfloat16",
                         recurrent_weight_init="standard")
cell = sLSTMCell(config).cuda().train()
compile_s = time.perf_counter() - t0
x = torch.randn(B, T, 4 * H * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dy = None
def fwd():
    with torch.no_grad():
        return cell(x)[0]
def fwd_bwd():
    global dy
    x.grad = None
    cell.zero_grad(set_to_none=True)
    y = cell(x)[0]
    if dy is None:
        dy = torch.randn_like(y)
    y.backward(dy)
print("RESULT" + json.dumps({"fwd_ms": median_ms(fwd, "cuda", reps), "fwd_bwd_ms": median_ms(fwd_bwd, "cuda", reps),
                            "compile_s": compile_s}))
"""


def official(shape, reps, timeout_s):
    """The official xlstm CUDA sLSTM in a subprocess: timings, or why it did not run."""
    import subprocess

    try:
        import xlstm  # noqa: F401
    except ImportError as error:
        return {"status": f"not installed: {error}"}
    try:
        proc = subprocess.run([sys.executable, "-c", OFFICIAL_SCRIPT, *map(str, shape), str(reps),
                               os.path.dirname(os.path.abspath(__file__))],
                              capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"status": f"did not finish within {timeout_s} s (compile + timing)"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return {"status": "ran", **json.loads(line[len("RESULT"):])}
    tail = (proc.stdout + proc.stderr)[-1500:]
    return {"status": f"failed (exit code {proc.returncode})", "output_tail": tail}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["shapes"])
    keys = ("fused_float32", "triton_float32", "triton_bfloat16")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        values = [result["shapes"][s]["timings"][key]["fwd_bwd_ms"] for s in labels]
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=key)
    ax.set_xticks([i + width for i in range(len(labels))], labels)
    ax.set_yscale("log")
    ax.set_ylabel("forward + backward, ms (log)")
    ax.set_title(f"sLSTM on {result['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--official-timeout", type=int, default=240, help="seconds for the official kernel's compile+run")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("gpu_slstm.py: no CUDA device (use --smoke to check the script on the CPU interpreter)")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "shapes": {},
    }
    for shape in SMOKE_SHAPES if args.smoke else SHAPES:
        label = "B{}xT{}x{}hx{}d".format(*shape)
        entry = {"check_rel_err": check(shape, device), "timings": timings(shape, device, args.reps)}
        if not args.smoke:
            entry["launch_sweep_bf16_fwd_bwd_ms"] = sweep(shape, device, args.reps)
            entry["official_xlstm_cuda_bf16"] = official(shape, args.reps, args.official_timeout)
            if entry["official_xlstm_cuda_bf16"].get("status") == "ran":
                official_ms = entry["official_xlstm_cuda_bf16"]["fwd_bwd_ms"]
                for key in ("triton_bfloat16", "triton_float32"):
                    if "fwd_bwd_ms" in entry["timings"][key]:
                        entry["timings"][key]["speedup_vs_official_fwd_bwd"] = official_ms / entry["timings"][key][
                        "fwd_bwd_ms"]
        result["shapes"][label] = entry
        print(label, json.dumps(entry, indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = "gpu_slstm_smoke" if args.smoke else "gpu_slstm"
    with open(os.path.join(args.out, f"{stem}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    plot(result, os.path.join(args.out, f"{stem}.png"))


if __name__ == "__main__":
    main()
