"""World size 1 FSDP against the plain trainer on one GPU (issue 24 point 3): is `train.parallel=fsdp` on one device
within 5% of `train.parallel=none` in training tokens/s?

Run on a CUDA machine:  python benchmarks/fsdp_single_gpu.py --out $OUT   (all variants x 2 presets: several minutes
on an H200; --rounds 3 --steps 10, or fewer --variants, for a quicker look)

Host time on the CPU (the GPU step is host-bound: what FSDP adds on the host is what it costs there), the 125M
model's structure (12 blocks) at a width where compute is small, FSDP's bf16 mixed precision on:
    OMP_NUM_THREADS=1 python benchmarks/fsdp_single_gpu.py --out $OUT --device cpu --size tiny --num-blocks 12 \
        --d-model 32 --context 16 --batch-size 1 --precision bf16 --presets xlstm-large --rounds 20 --steps 3 --profile

Per preset (125M parameters, `revival.bench.models.bench_config`) it builds one `revival.train.Trainer` per variant
(`VARIANTS`, `--variants`) from one run config: `train.parallel` none or fsdp (a process group of one), AdamW fused
(the default on CUDA; here on the CPU too, so a CPU run times the GPU's optimizer path) or foreach, under FSDP on the
local shards (the default) or on the DTensors, FSDP blocks keeping their gathered parameters to the backward (the
default at world size 1) or resharding after forward, clipping on the local shards (the default) or on the DTensors,
the host-time cuts of `docs/distributed.md` or not; all bf16 on CUDA (autocast; FSDP gathers bf16 parameters and
reduces fp32 gradients). It times their `train_step` (the step `Trainer.train` runs: forward, backward, clipping,
AdamW, scheduler) in alternating rounds after warm-up steps, so drift of the clock or of other load hits all alike.
tokens/s, ms per step (wall) and CPU ms per step (this process's CPU time) of a variant are medians over its rounds.
Writes fsdp_single_gpu.json: every round, the medians, the ratio fsdp / none of the defaults, `within_5_percent`, the
same ratio before issue 24 point 3 (fsdp-foreach-reshard / none-foreach), peak memory, the first losses of each
variant (close, not equal: bf16 parameters under FSDP, fp32 under autocast in the plain trainer) and, with
--profile, the host time of FSDP's own regions per step (`fsdp_regions`: its `FSDP::...` profiler labels, summed over
blocks); with --callgrind, the instructions per step of each variant (times on a shared CPU move by 20% from round to
round, the counts by 0.03%):
    OMP_NUM_THREADS=1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$OUT/callgrind.out \
        python benchmarks/fsdp_single_gpu.py ... (the host-time mode above) --rounds 1 --warmup 2 --callgrind
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from revival.bench.models import bench_config  # noqa: E402
from revival.bench.report import environment, write_json  # noqa: E402
from revival.data import ByteTokenizer, load_corpus  # noqa: E402
from revival.models import preset_config  # noqa: E402
from revival.train.config import RunConfig  # noqa: E402
from revival.train.distributed import LocalShardAdamW  # noqa: E402
from revival.train.trainer import Trainer  # noqa: E402


class Variant(NamedTuple):
    """A trainer configuration; None: the trainer's default (`build_trainer`)."""

    parallel: str  # train.parallel
    fused: bool | None = None  # fused AdamW; None: fused (the CUDA default, taken on the CPU too)
    reshard: bool | None = None  # FSDP blocks reshard after forward (default: not at world size 1)
    local_clip: bool | None = None  # False: torch's clip_grad_norm_ on the DTensors
    local_adamw: bool | None = None  # False: torch's AdamW on the DTensors
    host_cuts: bool | None = None  # False: FSDP's sync switch set at every micro-batch, an import per AdamW tensor


# The first two are the defaults (the target ratio is fsdp / none); the others undo issue 24 point 3's changes one by
# one, to see what each bought: foreach AdamW, resharding blocks, torch's clip_grad_norm_ on the DTensors, torch's
# AdamW on the DTensors, the host-time cuts; fsdp-foreach-reshard undoes them all (the "before").
VARIANTS = {"none": Variant("none"), "fsdp": Variant("fsdp"),
            "none-foreach": Variant("none", fused=False), "fsdp-foreach": Variant("fsdp", fused=False, reshard=False),
            "fsdp-foreach-reshard": Variant("fsdp", fused=False, reshard=True, local_clip=False, local_adamw=False,
                                            host_cuts=False),
            "fsdp-dtensor-clip": Variant("fsdp", local_clip=False),
            "fsdp-dtensor-adamw": Variant("fsdp", local_adamw=False),
            "fsdp-no-host-cuts": Variant("fsdp", host_cuts=False)}


def model_section(preset: str, size: str, num_blocks: int | None = None, d_model: int | None = None) -> dict:
    """The run config's `model` section for `preset` at bench `size` (with `num_blocks` / `d_model` instead of the
    size's, where given): the preset name plus the fields that differ from the preset's."""
    config, default = bench_config(preset, size).to_dict(), preset_config(preset).to_dict()
    config["vocab_size"] = max(config["vocab_size"], ByteTokenizer().vocab_size)  # "tiny" has 256, bytes need 257
    if num_blocks is not None:
        config["pattern"] = preset_config(preset, num_blocks=num_blocks).pattern
    if d_model is not None:
        config["d_model"] = d_model
    return {"preset": preset, **{key: value for key, value in config.items() if value != default.get(key)}}


class PerTensorImportAdamW(LocalShardAdamW):
    """LocalShardAdamW as it was before the host-time cuts: the DTensor class imported once per tensor."""

    def _init_group(self, group, *arguments):
        has_complex = torch.optim.AdamW._init_group(self, group, *arguments)
        for tensors in arguments:
            if isinstance(tensors, list):
                tensors[:] = [_local_with_import(tensor) for tensor in tensors]
        return has_complex


def _local_with_import(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


@contextlib.contextmanager
def sync_switch_every_micro_batch(module, enabled: bool):
    """`distributed.gradient_sync` under FSDP as it was before the host-time cuts: the switch set on every entry."""
    module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


class VariantTrainer(Trainer):
    """A Trainer configured as a `Variant` says: AdamW fused or foreach, on FSDP's local shards or on its DTensors;
    clipping the trainer's (local shards under FSDP) or torch's on the whole model; with or without the host-time
    cuts."""

    def __init__(self, run: RunConfig, variant: Variant, **kwargs):
        self.variant = variant
        super().__init__(run, **kwargs)

    def _make_optimizer(self, fused: bool | None = None, local_shards: bool | None = None) -> torch.optim.Optimizer:
        optimizer = super()._make_optimizer(fused=self.variant.fused is not False,
                                            local_shards=self.variant.local_adamw)
        if self.variant.host_cuts is False and isinstance(optimizer, LocalShardAdamW):
            optimizer.__class__ = PerTensorImportAdamW  # no state yet: the same optimizer with the old _init_group
        return optimizer

    def _clip_gradients(self) -> torch.Tensor:
        if self.variant.local_clip is False:
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        return super()._clip_gradients()

    def _gradient_sync(self, enabled: bool):
        if self.variant.host_cuts is False and self.world.parallel == "fsdp":
            return sync_switch_every_micro_batch(self.train_module, enabled)
        return super()._gradient_sync(enabled)


def build_trainer(preset: str, args, name: str, corpus, out_dir: Path) -> Trainer:
    variant = VARIANTS[name]
    run = RunConfig.from_dict({
        "model": model_section(preset, args.size, args.num_blocks, args.d_model),
        "data": {"corpus": "stdlib-notests", "tokenizer": "byte", "context_length": args.context},
        "train": {"steps": 10**6, "batch_size": args.batch_size, "warmup_steps": 10, "device": args.device,
                  "precision": args.precision, "parallel": variant.parallel, "progress": False,
                  "tensorboard": False, "out_dir": str(out_dir / f"{preset}-{name}")}})
    trainer = VariantTrainer(run, variant, corpus=corpus, force=True)
    if variant.reshard:  # FSDP2's runtime switch; the root keeps its parameters (as wrap_model sets it)
        trainer.model.set_reshard_after_forward(True)
        trainer.model.set_reshard_after_forward(False, recurse=False)
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_round(trainer: Trainer, steps: int) -> dict:
    """`steps` train steps: tokens/s (all ranks' tokens; one rank here), wall and CPU (this process) ms per step."""
    sync(trainer.device)
    tokens_before, start, cpu_start = trainer.tokens_seen, time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"tokens_per_s": (trainer.tokens_seen - tokens_before) / wall, "ms_per_step": 1e3 * wall / steps,
            "cpu_ms_per_step": 1e3 * cpu / steps}


def callgrind(*arguments: str) -> str:
    """Send `arguments` to the callgrind run of this process (callgrind_control); returns its answer."""
    done = subprocess.run(["callgrind_control", *arguments, str(os.getpid())], capture_output=True, text=True)
    if not done.stdout.startswith(f"PID {os.getpid()}:"):  # else "Error: ... not detected" (with exit status 0)
        raise SystemExit("--callgrind: run this script under `valgrind --tool=callgrind --instr-atstart=no`; "
                         f"callgrind_control answered: {(done.stdout + done.stderr).strip()!r}")
    return done.stdout


def counted_steps(trainer: Trainer, steps: int) -> float:
    """Instructions per train step of `steps` steps, counted by callgrind (all threads; instrumentation on only for
    them): deterministic, where times on a shared machine are not."""
    callgrind("--zero")
    callgrind("--instr=on")
    for _ in range(steps):
        trainer.train_step()
    totals = callgrind("-e", "-b").split("Frame:")[0]  # "Totals: Ir" then "Th 1  231,634,395" per thread
    callgrind("--instr=off")
    return sum(int(count.replace(",", "")) for count in re.findall(r"^\s*Th \d+\s+([\d,]+)", totals, re.M)) / steps


def fsdp_regions(averages, steps: int) -> list[dict]:
    """Host ms per step of each of FSDP's profiler regions (`FSDP::pre_forward (blocks.3)` and the like, summed over
    the modules: `FSDP::pre_forward`), most first; a region's time includes the regions and ops inside it."""
    regions: dict[str, list[float]] = {}
    for average in averages:
        if average.key.startswith("FSDP::"):
            name = average.key.split(" (")[0].split(" for ")[0]
            total = regions.setdefault(name, [0.0, 0])
            total[0] += average.cpu_time_total / 1e3 / steps
            total[1] += average.count / steps
    return [{"name": name, "host_ms": ms, "calls": calls}
            for name, (ms, calls) in sorted(regions.items(), key=lambda item: -item[1][0])]


def profile_step(trainer: Trainer, steps: int = 1, top: int = 15) -> dict:
    """`steps` train steps under torch.profiler, per step: wall time, the GPU's busy time (kernels and copies),
    launches, the ops with most device / host time and FSDP's own regions. Busy time near the wall time: the GPU is
    the limit; far below: the host is."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if trainer.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sync(trainer.device)
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync(trainer.device)
        wall = time.perf_counter() - start
    device_events = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    averages = profiler.key_averages()

    def table(key: str) -> list[dict]:
        rows = sorted(averages, key=lambda a: -getattr(a, key))[:top]
        return [{"name": a.key, "calls": a.count / steps, "device_ms": a.self_device_time_total / 1e3 / steps,
                 "host_ms": a.self_cpu_time_total / 1e3 / steps} for a in rows]

    return {"steps": steps, "wall_ms": 1e3 * wall / steps,
            "device_busy_ms": sum(event.self_device_time_total for event in device_events) / 1e3 / steps,
            "device_events": len(device_events) / steps, "top_device": table("self_device_time_total"),
            "top_host": table("self_cpu_time_total"), "fsdp_regions": fsdp_regions(averages, steps)}


def measure(preset: str, args, variants: list[str], corpus, out_dir: Path) -> dict:
    trainers = {variant: build_trainer(preset, args, variant, corpus, out_dir) for variant in variants}
    device = trainers[variants[0]].device
    record = {"preset": preset, "parameters": trainers[variants[0]].model.num_parameters(),
              "model": model_section(preset, args.size, args.num_blocks, args.d_model), "modes": {}}
    for name, trainer in trainers.items():
        losses = [trainer.train_step() for _ in range(args.warmup)]  # compiles kernels, warms the allocator
        variant = VARIANTS[name]
        record["modes"][name] = {"parallel": variant.parallel, "fused": bool(trainer.optimizer.defaults["fused"]),
                                 "local_shard_adamw": isinstance(trainer.optimizer, LocalShardAdamW),
                                 "blocks_reshard": (trainer.world.world_size > 1 if variant.reshard is None
                                                    else variant.reshard)
                                 if variant.parallel == "fsdp" else None,  # None resolved as wrap_model does
                                 "host_cuts": variant.host_cuts is not False, "first_losses": losses, "rounds": []}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            record["modes"][name]["rounds"].append(timed_round(trainer, args.steps))
    for entry in record["modes"].values():
        for key in ("tokens_per_s", "ms_per_step", "cpu_ms_per_step"):
            entry[key] = statistics.median(round_[key] for round_ in entry["rounds"])
    if args.callgrind:
        for name, trainer in trainers.items():
            record["modes"][name]["instructions_per_step"] = counted_steps(trainer, args.steps)
    if args.profile:
        for name, trainer in trainers.items():
            record["modes"][name]["profile"] = profile_step(trainer, args.profile_steps)
    if device.type == "cuda":
        record["peak_memory_bytes_all_trainers"] = torch.cuda.max_memory_allocated(device)
    speed = {name: entry["tokens_per_s"] for name, entry in record["modes"].items()}
    ratio = speed["fsdp"] / speed["none"]
    record.update(fsdp_over_none=ratio, within_5_percent=ratio >= 0.95)
    if "none-foreach" in speed and "fsdp-foreach-reshard" in speed:
        record["before_fsdp_over_none"] = speed["fsdp-foreach-reshard"] / speed["none-foreach"]
    print(f"{preset}: " + ", ".join(f"{name} {entry['tokens_per_s']:,.0f} tokens/s ({entry['ms_per_step']:.2f} ms, "
                                    f"CPU {entry['cpu_ms_per_step']:.2f} ms a step"
                                    + (f", {entry['instructions_per_step'] / 1e6:.2f}M instructions"
                                       if args.callgrind else "") + ")"
                                    for name, entry in record["modes"].items())
          + f"; fsdp / none {ratio:.3f}", flush=True)
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
    parser.add_argument("--num-blocks", type=int, help="blocks instead of the size's (the CPU host-time mode: 12)")
    parser.add_argument("--d-model", type=int, help="d_model instead of the size's (the CPU host-time mode: 32)")
    parser.add_argument("--precision", default="auto",
                        help="train.precision: auto | bf16 | fp32 (default: auto, bf16 on CUDA; bf16 on the CPU "
                             "runs FSDP's mixed precision as on the GPU)")
    parser.add_argument("--profile", action="store_true", help="also profile steps of each mode (torch.profiler)")
    parser.add_argument("--callgrind", action="store_true",
                        help="also count the instructions of --steps steps per mode (run the script under "
                             "`valgrind --tool=callgrind --instr-atstart=no`)")
    parser.add_argument("--profile-steps", type=int, default=1, help="steps per profile (default: 1)")
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
