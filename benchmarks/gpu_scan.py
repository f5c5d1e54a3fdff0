"""GPU benchmark of the minGRU / minLSTM layers (in-projection + scan) against torch.nn.LSTM (cuDNN) and a step
loop of torch.nn.LSTMCell, T=4096, B=64, D=256, float32 (issue 5, item 5).

Run on a CUDA machine:  python benchmarks/gpu_scan.py --out benchmarks/results [--skip-sweep]
In one process it (1) measures the copy bandwidth (the ceiling of these memory-bound kernels), (2) tries a few tile
shapes for each Triton kernel and reports the fastest, (3) checks the Triton scans and the layers' Triton path at
full shape against float64 reference loops (forward and gradients, fresh random inputs, freed memory poisoned with NaN),
(4) times forward (no grad) and forward+backward (triton.testing.do_bench medians; the LSTMCell loop by CUDA events,
few repetitions) under two float32 matmul settings: "highest" (strict float32, TF32 off in cuBLAS, cuDNN and tl.dot)
and "high" (TF32 matmuls; cuDNN's default for the LSTM), and writes gpu_scan.json + gpu_scan.png.
Layers: MinGRU / MinLSTM(256, expansion=1, conv_kernel=0): y = h, projection + scan only, as nn.LSTM(256, 256).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback

import torch
from _timing import do_bench_ms, median_ms, wall_ms
from torch import nn

B, T, D = 64, 4096, 256
DEV = "cuda"  # --smoke: "cpu" under TRITON_INTERPRET=1 at a tiny shape (checks the script, times nothing real)
ANCHORS_MS = {"cudnn_fwd": 45.7, "lstmcell_loop_fwd": 418.7, "naive_log_scan_fwd": 9.56}  # H100, issue 5


def bench(fn, grads=None, rep=200):
    """do_bench's median on the GPU; under --smoke one call's wall time (checks the script, times nothing real)."""
    if DEV == "cpu":
        return wall_ms(fn, DEV)
    return do_bench_ms(fn, grads, rep)


def set_precision(mode: str) -> None:
    torch.set_float32_matmul_precision(mode)
    torch.backends.cudnn.allow_tf32 = mode != "highest"


def poison():
    """Fill free allocator memory with NaN so that an output element the kernels do not write shows up."""
    if DEV == "cpu":
        return
    blob = torch.full((int(torch.cuda.mem_get_info()[0] * 0.3) // 4,), float("nan"), device=DEV)
    del blob


def rel(got, ref) -> float:
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("nan")
    return ((got - ref).norm() / ref.norm()).item()


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(256 * 2**20 if DEV == "cuda" else 1024, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e9


# ----------------------------------------------------------------------------------------------- checks
def check_scans(seed=0):
    """Triton scans (gate math fused) vs the float64 loops of linear_scan, forward + gradients, full shape."""
    from revival.ops.linear_scan import mingru_scan, minlstm_scan
    from revival.ops.linear_scan import triton as ts

    out = {}
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, fast, ref, n in (("mingru", ts.mingru_scan_triton, mingru_scan, 2),
                               ("minlstm", ts.minlstm_scan_triton, minlstm_scan, 3)):
        xs = [torch.randn(B, T, D, device=DEV, generator=g, dtype=torch.float64) * 2 for _ in range(n)]
        h0 = torch.randn(B, D, device=DEV, generator=g, dtype=torch.float64)
        weight = torch.randn(B, T, D, device=DEV, generator=g, dtype=torch.float64)
        leaves64 = [x.clone().requires_grad_() for x in (*xs, h0)]
        h_ref, last_ref = ref(*leaves64, impl="reference")
        ((h_ref * weight).sum() + last_ref.sum()).backward()
        poison()
        leaves32 = [x.float().requires_grad_() for x in (*xs, h0)]
        h, last = fast(*leaves32)
        ((h * weight.float()).sum() + last.sum()).backward()
        out[name] = {"h": rel(h, h_ref), "h_last": rel(last, last_ref),
                     **{f"grad_{i}": rel(a.grad, b.grad) for i, (a, b) in enumerate(zip(leaves32, leaves64))}}
        del leaves64, leaves32, h_ref, h
    return out


def check_layers(seed=1):
    """The layers' Triton path in float32 (cuBLAS in-projection + the scan kernel) vs the float64 layer with the
    reference loop."""
    from revival.layers.mingru import MinGRU
    from revival.layers.minlstm import MinLSTM

    out = {}
    for cls, kwargs in ((MinGRU, {"expansion": 1.0, "conv_kernel": 0}),
                        (MinLSTM, {"expansion": 1.5, "conv_kernel": 4, "bias": True})):
        torch.manual_seed(seed)
        ref = cls(D, scan_impl="reference", **kwargs).double().to(DEV)
        fast = cls(D, scan_impl="triton", **kwargs).to(DEV)  # what "auto" (the default) picks on CUDA
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(B, T, D, device=DEV, dtype=torch.float64)
        dy = torch.randn(B, T, D, device=DEV, dtype=torch.float64)
        y_ref, _ = ref(x)
        (y_ref * dy).sum().backward()
        with torch.no_grad():  # g(x) has a kink at 0 (g' jumps from 1/4 to 1): inputs within rounding of it
            hidden = ref.in_proj(x if ref.conv is None else x + ref.conv(x)[0])[..., :ref.d_inner]
            out[f"{cls.__name__}_hidden_preacts_within_1e-7_of_0"] = int((hidden.abs() < 1e-7).sum())
        for mode in ("highest", "high"):
            set_precision(mode)
            fast.zero_grad()
            poison()
            y, _ = fast(x.float())
            (y * dy.float()).sum().backward()
            grads = {f"grad_{n}": rel(p.grad, q.grad) for (n, p), q in zip(fast.named_parameters(), ref.parameters())}
            out[f"{cls.__name__}{kwargs}_{mode}"] = {"y": rel(y, y_ref), **grads}
        del ref, fast, y_ref
    set_precision("highest")
    return out


# ----------------------------------------------------------------------------------------------- tile sweep
def sweep():
    """Try tile shapes per kernel on minLSTM inputs (the heaviest), keep the fastest; returns all timings."""
    import dataclasses

    from revival.ops.linear_scan import triton as ts

    x = [torch.randn(B, T, D, device=DEV) for _ in range(3)]
    dh = torch.randn(B, T, D, device=DEV)
    results = {"forward": {}, "backward": {}}
    scan_tiles = [(16, 32, 4), (32, 32, 4), (32, 32, 2), (64, 32, 4), (16, 64, 4), (32, 64, 4), (32, 16, 1),
                  (16, 16, 1)]
    if DEV == "cpu":
        scan_tiles = scan_tiles[:2]

    def pick(key, fields, run):
        best = None
        for tiles in scan_tiles:
            launch = ts.LaunchConfig(**dict(zip(fields, tiles)))
            try:
                ms = bench(lambda launch=launch: run(launch), rep=40)
            except Exception as exc:  # noqa: BLE001 - a tile the compiler rejects is recorded and skipped
                ms = f"error: {type(exc).__name__}: {exc}"[:200]
            results[key][str(tiles)] = ms
            if isinstance(ms, float) and (best is None or ms < best[0]):
                best = (ms, tiles)
        return best

    chosen = {}
    with torch.no_grad():
        chosen["forward"] = pick("forward", ("block_t", "block_d", "num_warps"),
                                 lambda launch: ts.minlstm_scan_triton(*x, launch=launch))
    leaves = [t.requires_grad_() for t in x]

    def backward(launch):
        h, _ = ts.minlstm_scan_triton(*leaves, launch=launch)
        return torch.autograd.grad(h, leaves, dh)

    chosen["backward"] = pick("backward", ("backward_block_t", "backward_block_d", "backward_num_warps"), backward)
    results["default"] = dataclasses.asdict(ts.LaunchConfig())
    results["chosen"] = chosen  # (ms, tiles) of the fastest per kernel, None where every tile failed
    return results


# ----------------------------------------------------------------------------------------------- timings
def lstmcell_loop(cell, x):
    h = c = x.new_zeros(x.shape[0], cell.hidden_size)
    outputs = []
    for t in range(x.shape[1]):
        h, c = cell(x[:, t], (h, c))
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def time_all(mode: str, loop_reps: int):
    from revival.layers.mingru import MinGRU
    from revival.layers.minlstm import MinLSTM
    from revival.ops.linear_scan import mingru_scan, minlstm_scan

    set_precision(mode)
    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=DEV, requires_grad=True)
    dy = torch.randn(B, T, D, device=DEV)
    layer = lambda cls, impl: cls(D, expansion=1.0, conv_kernel=0, scan_impl=impl).to(DEV)  # noqa: E731
    gru, lstm_min = layer(MinGRU, "triton"), layer(MinLSTM, "triton")  # = the default "auto" on CUDA
    gru_log, lstm_min_log = layer(MinGRU, "log"), layer(MinLSTM, "log")

    def unfused(module, scan):  # projection by cuBLAS, then the Triton scan with the gate math fused
        def run(inp):
            branches = module.in_proj(inp).chunk(module.num_branches, dim=-1)
            return scan(*branches)[0]
        return run

    methods = {
        "minGRU cuBLAS + Triton scan": (unfused(gru, lambda h, g: mingru_scan(g, h, impl="triton")),
                                        list(gru.parameters())),
        "minLSTM cuBLAS + Triton scan": (unfused(lstm_min, lambda h, f, i: minlstm_scan(f, i, h, impl="triton")),
                                         list(lstm_min.parameters())),
        "minGRU log-space torch": (lambda inp: gru_log(inp)[0], list(gru_log.parameters())),
        "minLSTM log-space torch": (lambda inp: lstm_min_log(inp)[0], list(lstm_min_log.parameters())),
    }
    cudnn = nn.LSTM(D, D, batch_first=True).to(DEV)
    methods["nn.LSTM (cuDNN)"] = (lambda inp: cudnn(inp)[0], list(cudnn.parameters()))
    cell = nn.LSTMCell(D, D).to(DEV)
    times = {}
    for name, (fn, params) in methods.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x)

        def fwd_bwd(fn=fn):
            fn(x).backward(dy)

        try:
            times[name] = {"fwd": bench(fwd), "fwd_bwd": bench(fwd_bwd, grads=[x, *params])}
        except Exception as exc:  # noqa: BLE001 - record the failure, time the rest
            times[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            traceback.print_exc()
        print(f"  [{mode}] {name}: {times[name]}", flush=True)

    def loop_fwd():
        with torch.no_grad():
            lstmcell_loop(cell, x)

    def loop_fwd_bwd():
        x.grad = None
        lstmcell_loop(cell, x).backward(dy)

    times["nn.LSTMCell loop"] = {"fwd": median_ms(loop_fwd, DEV, loop_reps), "fwd_bwd": median_ms(loop_fwd_bwd, DEV, 2),
                                 "reps": {"fwd": loop_reps, "fwd_bwd": 2}}
    print(f"  [{mode}] nn.LSTMCell loop: {times['nn.LSTMCell loop']}", flush=True)
    times["layer default path"] = "cuBLAS + Triton scan"
    set_precision("highest")
    return times


def ratios(times):
    cudnn, loop = times["nn.LSTM (cuDNN)"], times["nn.LSTMCell loop"]
    out = {}
    for name, t in times.items():
        if not isinstance(t, dict) or "fwd" not in t or name.startswith("nn."):
            continue
        out[name] = {"fwd_x_loop": loop["fwd"] / t["fwd"], "fwd_x_cudnn": cudnn["fwd"] / t["fwd"],
                     "fwd_bwd_x_cudnn": cudnn["fwd_bwd"] / t["fwd_bwd"],
                     "fwd_bwd_x_loop": loop["fwd_bwd"] / t["fwd_bwd"]}
        out[name]["targets_met"] = {"fwd >= 1000x loop": out[name]["fwd_x_loop"] >= 1000,
                                    "fwd >= 10x cuDNN": out[name]["fwd_x_cudnn"] >= 10,
                                    "fwd+bwd >= 10x cuDNN": out[name]["fwd_bwd_x_cudnn"] >= 10}
    return out


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["timings_ms"])
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 5.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        times = {k: v for k, v in result["timings_ms"][mode].items() if isinstance(v, dict) and "fwd" in v}
        names = list(times)
        pos = range(len(names))
        ax.barh([p - 0.2 for p in pos], [times[n]["fwd"] for n in names], height=0.4, label="forward")
        ax.barh([p + 0.2 for p in pos], [times[n]["fwd_bwd"] for n in names], height=0.4, label="forward+backward")
        for p, n in zip(pos, names):
            ax.text(times[n]["fwd"], p - 0.2, f" {times[n]['fwd']:.3g}", va="center", fontsize=7)
            ax.text(times[n]["fwd_bwd"], p + 0.2, f" {times[n]['fwd_bwd']:.3g}", va="center", fontsize=7)
        ax.set_yticks(list(pos), names, fontsize=8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms (log scale)")
        ax.set_title(f"float32 matmul precision '{mode}'", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"minGRU/minLSTM vs LSTM, B={B} T={T} D={D} float32, {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--loop-reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    global B, T, D, DEV
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        B, T, D, DEV = 2, 70, 32, "cpu"
    import triton

    start = time.time()
    result = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
              "torch": torch.__version__, "triton": triton.__version__,
              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
              "shape": {"B": B, "T": T, "D": D, "dtype": "float32"}, "anchors_ms_h100": ANCHORS_MS}
    result["copy_bandwidth_TBps"] = copy_bandwidth()
    floor_ms = 2 * B * T * D * 4 / (result["copy_bandwidth_TBps"] * 1e9)  # read x, write h
    result["fused_forward_floor_ms"] = floor_ms
    print(f"copy {result['copy_bandwidth_TBps']:.2f} TB/s; fused forward floor {floor_ms:.3f} ms", flush=True)
    if not args.skip_sweep:
        result["tile_sweep_ms"] = sweep()
        print("sweep:", json.dumps(result["tile_sweep_ms"]["chosen"]), flush=True)
    set_precision("highest")
    for name, fn in (("scans_vs_float64", check_scans), ("layers_vs_float64", check_layers)):
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            traceback.print_exc()
        print(name, json.dumps(result[name]), flush=True)
    result["timings_ms"] = {mode: time_all(mode, args.loop_reps) for mode in ("highest", "high")}
    result["ratios"] = {mode: ratios(t) for mode, t in result["timings_ms"].items()}
    result["wall_s"] = time.time() - start
    with open(f"{args.out}/gpu_scan.json", "w") as f:
        json.dump(result, f, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    plot(result, f"{args.out}/gpu_scan.png")
    print(f"\n{'method':32s} {'mode':8s} {'fwd ms':>9s} {'f+b ms':>9s} {'fwd/loop':>9s} {'fwd/cuDNN':>9s} "
          f"{'f+b/cuDNN':>9s}")
    for mode, times in result["timings_ms"].items():
        for name, t in times.items():
            r = result["ratios"][mode].get(name, {})
            if isinstance(t, dict) and "fwd" in t:
                print(f"{name:32s} {mode:8s} {t['fwd']:9.3f} {t['fwd_bwd']:9.3f} {r.get('fwd_x_loop', 0):9.0f} "
                      f"{r.get('fwd_x_cudnn', 0):9.1f} {r.get('fwd_bwd_x_cudnn', 0):9.1f}")
    print(f"wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
