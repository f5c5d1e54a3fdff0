"""World size 1 FSDP against the plain trainer on one GPU (issue 24 point 3): is `train.parallel=fsdp` on one device
within 5% of `train.parallel=none` in training tokens/s?

Run on a CUDA machine:  python benchmarks/fsdp_single_gpu.py --out $OUT   (7 variants x 2 presets: several minutes
on an H200; --rounds 3 --steps 10, or fewer --variants, for a quicker look)

Per preset (125M parameters, `revival.bench.models.bench_config`) it builds one `revival.train.Trainer` per variant
(`VARIANTS`, `--variants`) from one run config: `train.parallel` none or fsdp (a process group of one), AdamW fused
(the default on CUDA) or foreach, under FSDP on the local shards (the default) or on the DTensors, FSDP blocks keeping
their gathered parameters to the backward (the default at world size 1) or resharding after forward, clipping on the
local shards (the default) or on the DTensors; all bf16 (autocast; FSDP gathers bf16 parameters and reduces fp32
gradients). It times their `train_step` (the step `Trainer.train` runs: forward, backward, clipping, AdamW, scheduler)
in alternating rounds after warm-up steps, so drift of the GPU's clock hits all alike. tokens/s of a variant is the
median over its rounds. Writes fsdp_single_gpu.json: every round, the medians, the ratio fsdp / none of the defaults,
`within_5_percent`, the same ratio before issue 24 point 3 (fsdp-foreach-reshard / none-foreach), peak memory and the
first losses of each variant (close, not equal: bf16 parameters under FSDP, fp32 under autocast in the plain trainer).
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
from revival.train.distributed import LocalShardAdamW  # noqa: E402
from revival.train.trainer import Trainer  # noqa: E402

# variant: (train.parallel, fused AdamW, blocks reshard after forward, clipping on the local shards, AdamW on the local
# shards; None: the trainer's default). The first two are the defaults (the target ratio is fsdp / none); the others
# undo issue 24 point 3's changes one by one, to see what each bought: foreach AdamW, resharding blocks, torch's
# clip_grad_norm_ on the DTensors, torch's AdamW on the DTensors; fsdp-foreach-reshard undoes them all (the "before").
VARIANTS = {"none": ("none", None, None, None, None), "fsdp": ("fsdp", None, None, None, None),
            "none-foreach": ("none", False, None, None, None), "fsdp-foreach": ("fsdp", False, False, None, None),
            "fsdp-foreach-reshard": ("fsdp", False, True, False, False),
            "fsdp-dtensor-clip": ("fsdp", None, None, False, None),
            "fsdp-dtensor-adamw": ("fsdp", None, None, None, False)}


def model_section(preset: str, size: str) -> dict:
    """The run config's `model` section for `preset` at bench `size`: the preset name plus the fields that differ."""
    config, default = bench_config(preset, size).to_dict(), preset_config(preset).to_dict()
    config["vocab_size"] = max(config["vocab_size"], ByteTokenizer().vocab_size)  # "tiny" has 256, bytes need 257
    return {"preset": preset, **{key: value for key, value in config.items() if value != default.get(key)}}


class VariantTrainer(Trainer):
    """A Trainer whose AdamW is fused or foreach, on FSDP's local shards or on its DTensors, as the variant says (None:
    the defaults: fused on CUDA, local shards under FSDP), and whose clipping is the trainer's (local shards under FSDP)
    or, with `local_clip` False, torch's on the whole model."""

    def __init__(self, run: RunConfig, fused: bool | None, local_clip: bool | None, local_adamw: bool | None,
                 **kwargs):
        self.fused, self.local_clip, self.local_adamw = fused, local_clip, local_adamw
        super().__init__(run, **kwargs)

    def _make_optimizer(self, fused: bool | None = None, local_shards: bool | None = None) -> torch.optim.Optimizer:
        return super()._make_optimizer(fused=self.fused, local_shards=self.local_adamw)

    def _clip_gradients(self) -> torch.Tensor:
        if self.local_clip is False:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        return super()._clip_gradients()


def build_trainer(preset: str, args, variant: str, corpus, out_dir: Path) -> Trainer:
    parallel, fused, reshard, local_clip, local_adamw = VARIANTS[variant]
    run = RunConfig.from_dict({
        "model": model_section(preset, args.size),
        "data": {"corpus": "stdlib-notests", "tokenizer": "byte", "context_length": args.context},
        "train": {"steps": 10**6, "batch_size": args.batch_size, "warmup_steps": 10, "device": args.device,
                  "precision": "auto", "parallel": parallel, "progress": False, "tensorboard": False,
                  "out_dir": str(out_dir / f"{preset}-{variant}")}})
    trainer = VariantTrainer(run, fused=fused, local_clip=local_clip, local_adamw=local_adamw, corpus=corpus,
                             force=True)
    if reshard:  # FSDP2's runtime switch; the root keeps its parameters (as wrap_model sets it)
        trainer.model.set_reshard_after_forward(True)
        trainer.model.set_reshard_after_forward(False, recurse=False)
    return trainer


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


def measure(preset: str, args, variants: list[str], corpus, out_dir: Path) -> dict:
    trainers = {variant: build_trainer(preset, args, variant, corpus, out_dir) for variant in variants}
    device = trainers[variants[0]].device
    record = {"preset": preset, "parameters": trainers[variants[0]].model.num_parameters(),
              "model": model_section(preset, args.size), "modes": {}}
    for variant, trainer in trainers.items():
        losses = [trainer.train_step() for _ in range(args.warmup)]  # compiles kernels, warms the allocator
        parallel, _, reshard, _, _ = VARIANTS[variant]
        record["modes"][variant] = {"parallel": parallel, "fused": bool(trainer.optimizer.defaults["fused"]),
                                    "local_shard_adamw": isinstance(trainer.optimizer, LocalShardAdamW),
                                    "blocks_reshard": (trainer.world.world_size > 1 if reshard is None else reshard)
                                    if parallel == "fsdp" else None,  # None resolved as wrap_model does
                                    "first_losses": losses, "rounds_tokens_per_s": []}
    for _ in range(args.rounds):
        for variant, trainer in trainers.items():
            record["modes"][variant]["rounds_tokens_per_s"].append(timed_round(trainer, args.steps))
    for entry in record["modes"].values():
        entry["tokens_per_s"] = statistics.median(entry["rounds_tokens_per_s"])
    if args.profile:
        for variant, trainer in trainers.items():
            record["modes"][variant]["profile"] = profile_step(trainer)
    if device.type == "cuda":
        record["peak_memory_bytes_all_trainers"] = torch.cuda.max_memory_allocated(device)
    speed = {variant: entry["tokens_per_s"] for variant, entry in record["modes"].items()}
    ratio = speed["fsdp"] / speed["none"]
    record.update(fsdp_over_none=ratio, within_5_percent=ratio >= 0.95)
    if "none-foreach" in speed and "fsdp-foreach-reshard" in speed:
        record["before_fsdp_over_none"] = speed["fsdp-foreach-reshard"] / speed["none-foreach"]
    print(f"{preset}: " + ", ".join(f"{variant} {value:,.0f}" for variant, value in speed.items())
          + f" tokens/s; fsdp / none {ratio:.3f}", flush=True)
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
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, must include none and fsdp (default: all of {list(VARIANTS)})")
    parser.add_argument("--device", default="cuda", help="default: cuda (cpu: a smoke test of the script)")
    args = parser.parse_args()
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown or not {"none", "fsdp"} <= set(variants):
        parser.error(f"--variants: expected names from {list(VARIANTS)} including none and fsdp, got {variants}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus("stdlib-notests", show_progress=False)
    results = {"benchmark": "fsdp_single_gpu", "settings": vars(args), "corpus": corpus.describe(), "presets": []}
    with tempfile.TemporaryDirectory() as runs:  # the trainers' out_dirs (nothing is saved)
        for preset in [name.strip() for name in args.presets.split(",") if name.strip()]:
            results["presets"].append(measure(preset, args, variants, corpus, Path(runs)))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    results["environment"] = environment(torch.device(args.device))
    results["within_5_percent"] = all(record["within_5_percent"] for record in results["presets"])
    write_json(results, out / "fsdp_single_gpu.json")
    print(f"wrote {out / 'fsdp_single_gpu.json'}; all within 5%: {results['within_5_percent']}")


if __name__ == "__main__":
    main()
