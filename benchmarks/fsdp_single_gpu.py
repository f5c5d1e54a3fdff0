"""World size 1 FSDP against the plain trainer on one GPU (issue 24 point 3): is `train.parallel=fsdp` on one device
within 5% of `train.parallel=none` in training tokens/s?

Run on a CUDA machine:  python benchmarks/fsdp_single_gpu.py --out $OUT        (about 2-3 minutes on an H200)

Per preset (125M parameters, `revival.bench.models.bench_config`) it builds two `revival.train.Trainer`s from one run
config that differ only in `train.parallel` (none; fsdp, a process group of one), both bf16 (autocast; FSDP gathers bf16
parameters and reduces fp32 gradients), and times their `train_step` (the step `Trainer.train` runs: forward,
backward, clipping, AdamW, scheduler) in alternating rounds after warm-up steps, so drift of the GPU's clock hits both
alike. tokens/s of a mode is the median over its rounds. Writes fsdp_single_gpu.json: every round, the medians, the
ratio fsdp / none, `within_5_percent`, peak memory and the first losses of each mode (close, not equal: bf16
parameters under FSDP, fp32 parameters under autocast in the plain trainer).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from revival.bench.models import bench_config  # noqa: E402
from revival.bench.report import environment, write_json  # noqa: E402
from revival.data import ByteTokenizer, load_corpus  # noqa: E402
from revival.models import preset_config  # noqa: E402
from revival.train.config import RunConfig  # noqa: E402
from revival.train.trainer import Trainer  # noqa: E402

MODES = ("none", "fsdp")


def model_section(preset: str, size: str) -> dict:
    """The run config's `model` section for `preset` at bench `size`: the preset name plus the fields that differ."""
    config, default = bench_config(preset, size).to_dict(), preset_config(preset).to_dict()
    config["vocab_size"] = max(config["vocab_size"], ByteTokenizer().vocab_size)  # "tiny" has 256, bytes need 257
    return {"preset": preset, **{key: value for key, value in config.items() if value != default.get(key)}}


def build_trainer(preset: str, args, parallel: str, corpus, out_dir: Path) -> Trainer:
    run = RunConfig.from_dict({
        "model": model_section(preset, args.size),
        "data": {"corpus": "stdlib-notests", "tokenizer": "byte", "context_length": args.context},
        "train": {"steps": 10**6, "batch_size": args.batch_size, "warmup_steps": 10, "device": args.device,
                  "precision": "auto", "parallel": parallel, "progress": False, "tensorboard": False,
                  "out_dir": str(out_dir / f"{preset}-{parallel}")}})
    return Trainer(run, corpus=corpus, force=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(trainer: Trainer, steps: int) -> float:
    """tokens/s of `steps` train steps (all ranks' tokens; one rank here)."""
    sync(trainer.device)
    tokens_before, start = trainer.tokens_seen, time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)
    return (trainer.tokens_seen - tokens_before) / (time.perf_counter() - start)


def profile_step(trainer: Trainer, top: int = 15) -> dict:
    """One train step under torch.profiler: wall time, the GPU's busy time (kernels and copies), launches, and the
    ops with most device / host time. Busy time near the wall time: the GPU is the limit; far below: the host is."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(trainer.device)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        trainer.train_step()
        sync(trainer.device)
        wall = time.perf_counter() - start
    device_events = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    averages = profiler.key_averages()

    def table(key: str) -> list[dict]:
        rows = sorted(averages, key=lambda a: -getattr(a, key))[:top]
        return [{"name": a.key, "calls": a.count, "device_ms": a.self_device_time_total / 1e3,
                 "host_ms": a.self_cpu_time_total / 1e3} for a in rows]

    return {"wall_ms": 1e3 * wall, "device_busy_ms": sum(event.self_device_time_total for event in device_events) / 1e3,
            "device_events": len(device_events), "top_device": table("self_device_time_total"),
            "top_host": table("self_cpu_time_total")}


def measure(preset: str, args, corpus, out_dir: Path) -> dict:
    trainers = {mode: build_trainer(preset, args, mode, corpus, out_dir) for mode in MODES}
    device = trainers["none"].device
    record = {"preset": preset, "parameters": trainers["none"].model.num_parameters(),
              "model": model_section(preset, args.size), "modes": {}}
    for mode, trainer in trainers.items():
        losses = [trainer.train_step() for _ in range(args.warmup)]  # compiles kernels, warms the allocator
        record["modes"][mode] = {"first_losses": losses, "rounds_tokens_per_s": []}
    for _ in range(args.rounds):
        for mode, trainer in trainers.items():
            record["modes"][mode]["rounds_tokens_per_s"].append(timed_round(trainer, args.steps))
    for entry in record["modes"].values():
        entry["tokens_per_s"] = statistics.median(entry["rounds_tokens_per_s"])
    if args.profile:
        for mode, trainer in trainers.items():
            record["modes"][mode]["profile"] = profile_step(trainer)
    if device.type == "cuda":
        record["peak_memory_bytes_both_trainers"] = torch.cuda.max_memory_allocated(device)
    ratio = record["modes"]["fsdp"]["tokens_per_s"] / record["modes"]["none"]["tokens_per_s"]
    record.update(fsdp_over_none=ratio, within_5_percent=ratio >= 0.95)
    print(f"{preset}: none {record['modes']['none']['tokens_per_s']:,.0f} tokens/s, fsdp "
          f"{record['modes']['fsdp']['tokens_per_s']:,.0f} tokens/s, ratio {ratio:.3f}", flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for fsdp_single_gpu.json")
    parser.add_argument("--presets", default="xlstm-large,llama", help="comma-separated (default: xlstm-large,llama)")
    parser.add_argument("--size", default="125m", help="bench size: tiny | 125m | 1.3b (default: 125m)")
    parser.add_argument("--batch-size", type=int, default=16, help="default: 16 (x 2048 = 32768 tokens a step)")
    parser.add_argument("--context", type=int, default=2048, help="default: 2048")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (default: 3)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round (default: 20)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per mode (default: 5)")
    parser.add_argument("--profile", action="store_true", help="also profile one step per mode (torch.profiler)")
    parser.add_argument("--device", default="cuda", help="default: cuda (cpu: a smoke test of the script)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus("stdlib-notests", show_progress=False)
    results = {"benchmark": "fsdp_single_gpu", "settings": vars(args), "corpus": corpus.describe(), "presets": []}
    with tempfile.TemporaryDirectory() as runs:  # the trainers' out_dirs (nothing is saved)
        for preset in [name.strip() for name in args.presets.split(",") if name.strip()]:
            results["presets"].append(measure(preset, args, corpus, Path(runs)))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    results["environment"] = environment(torch.device(args.device))
    results["within_5_percent"] = all(record["within_5_percent"] for record in results["presets"])
    write_json(results, out / "fsdp_single_gpu.json")
    print(f"wrote {out / 'fsdp_single_gpu.json'}; all within 5%: {results['within_5_percent']}")


if __name__ == "__main__":
    main()
