"""Where a training step's GPU time goes, per preset: one `revival bench train` step under torch.profiler.

Run on a CUDA machine:  python benchmarks/gpu_profile_train.py --out $OUT [--presets gated-deltanet,llama]

Per preset (125M by default, `revival.bench.models.bench_config`, random float32 weights, bf16 autocast, fused
AdamW, the batch `revival bench train` takes: tokens_per_step // context rows) it runs warm-up steps, times steps
with CUDA events, then profiles one step. Writes gpu_profile_train.json: wall and GPU-busy milliseconds of the
profiled step, device time per kernel family (`FAMILIES`, by kernel name) and the kernels with most device time. A
busy time far below the wall time says the host is the limit; the families say which part of the model to make
faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from revival.bench.cli import parse_context  # noqa: E402
from revival.bench.models import build_runner, tokens_batch  # noqa: E402
from revival.bench.report import environment, write_json  # noqa: E402
from revival.bench.studies import DEFAULTS  # noqa: E402

# family: substrings of kernel names (lower case), first match wins; the rest is "other"
FAMILIES = {
    "gemm": ("gemm", "cutlass", "sm90_xmma", "cublas", "nvjet", "splitk"),
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "delta_rule": ("delta", "wy_"),
    "ssd_mamba": ("ssd", "mamba", "_chunk_state", "_chunk_scan", "state_passing"),
    "mlstm_slstm": ("mlstm", "slstm"),
    "conv": ("conv",),
    "norm": ("norm", "layer_norm", "rms"),
    "softmax_loss": ("softmax", "cross_entropy", "nll", "log_softmax"),
    "optimizer": ("adam", "multi_tensor", "foreach"),
    "reduce": ("reduce",),
    "copy_cast": ("copy", "cat", "memcpy", "memset", "fill"),
    "elementwise": ("elementwise", "vectorized", "unrolled"),
}


def family(name: str) -> str:
    lower = name.lower()
    return next((key for key, parts in FAMILIES.items() if any(part in lower for part in parts)), "other")


def measure(preset: str, size: str, context: int, steps: int, top: int) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    # float32 weights under bf16 autocast, as `revival bench train` runs them (the weight casts and the float32
    # AdamW are part of its step); until session 20 this built bf16 weights: not the bench's step (GDN at 2k on the
    # H100: 129 ms here against the bench's 141 ms, the gap not yet broken down)
    runner = build_runner(preset, size, device, torch.float32, train=True)
    batch = max(1, DEFAULTS[size]["tokens_per_step"] // context)
    ids = tokens_batch(runner.config.vocab_size, batch, context + 1, device)
    model = runner.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = runner.loss(ids)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    step_ms = begin.elapsed_time(end) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profiler:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start)
    kernels = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in kernels:
        per_kernel[event.name][0] += event.self_device_time_total / 1e3
        per_kernel[event.name][1] += 1
    families: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        families[family(name)] += ms
    busy = sum(families.values())
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:top]
    record = {"preset": preset, "parameters": runner.num_parameters(), "batch": batch, "context": context,
              "tokens_per_s": batch * context / (step_ms / 1e3), "step_ms": step_ms,
              "profiled_wall_ms": wall_ms, "device_busy_ms": busy, "kernel_launches": len(kernels),
              "families_ms": dict(sorted(families.items(), key=lambda item: -item[1])),
              "top_kernels": [{"name": name[:160], "family": family(name), "ms": ms, "calls": calls}
                              for name, (ms, calls) in ranked]}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="gated-deltanet,hybrid,mamba2,mamba3,llama")
    parser.add_argument("--size", default="125m", choices=["125m", "1.3b"])
    parser.add_argument("--context", default="2k", help="context length, e.g. 2048 or 2k (default 2k)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps before the profiled one (default 3)")
    parser.add_argument("--top", type=int, default=20, help="kernels listed per preset (default 20)")
    parser.add_argument("--out", type=Path, default=Path("runs/profile"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    context = parse_context(args.context)
    result = {"environment": environment(torch.device("cuda")), "size": args.size, "context": context, "presets": {}}
    for preset in args.presets.split(","):
        record = measure(preset, args.size, context, args.steps, args.top)
        result["presets"][preset] = record
        families = ", ".join(f"{key} {ms:.1f}" for key, ms in record["families_ms"].items())
        print(f"{preset}: {record['tokens_per_s'] / 1e3:.0f}k tok/s, step {record['step_ms']:.1f} ms, "
              f"busy {record['device_busy_ms']:.1f} ms; {families}")
        for row in record["top_kernels"][:12]:
            print(f"    {row['ms']:8.2f} ms {row['calls']:5d}x  {row['name'][:110]}")
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(result, args.out / "gpu_profile_train.json")  # after every preset: a cut run keeps the rest
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
