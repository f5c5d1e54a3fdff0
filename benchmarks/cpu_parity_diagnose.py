"""Parity diagnosis on a CPU (issue 22): why sLSTM-containing xLSTMs miss 0.99 on 40-256 in some seeds, and which
single change to the curriculum recipe makes them reliable.

    OMP_NUM_THREADS=1 python benchmarks/cpu_parity_diagnose.py --preset 'xlstm[1:1]' --seed 0 --out DIR   (~5 min)
    OMP_NUM_THREADS=1 python benchmarks/cpu_parity_diagnose.py --preset 'xlstm[1:1]' --slstm-heads 1 --seed 0 ...
    OMP_NUM_THREADS=1 python benchmarks/cpu_parity_diagnose.py --out /tmp/p --smoke                        (seconds)
    python benchmarks/cpu_parity_diagnose.py --table DIR            # seeds x result table of every run in DIR

The training is `revival.eval.tasks`' curriculum run (`run_task` on configs/tasks/parity_gpu_curriculum.yaml:
model seeded by --seed, stage data seeds 1000, 2000, then the 3-40 split, batch order seed + stage, AdamW with the
decay / no-decay groups, warmup + cosine per stage, clip 1.0, stop at 0.99 test accuracy), written out here so that
each step can be watched and one thing changed: --lr, --clip, --curriculum / --steps, --warmup, --schedule,
--slstm-heads, --mlstm-heads, --forget-bias, --pattern. With no change it takes the same steps as `run_task`
(`--check` asserts the losses agree).
Differences, for speed: the test checks every --eval-every steps score the first --probe-test examples of the test
split (a pass there is confirmed on all 3000 before stopping), and the end scores all 3000.

Logged per --log-every steps: mean batch loss and accuracy since the last line, the largest gradient norm before
clipping; per check (and at each stage's end, where nothing stops): accuracy on 1000 held-out training strings by
length (3-12 / 13-24 / 25-40) and on the test probe by length (40-63 / 64-127 / 128-256). Writes DIR/<name>.json,
name = preset + the changes + seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from revival.data.tasks import IGNORE, TaskData, generate  # noqa: E402
from revival.eval.tasks import _batch, accuracy, load_recipe, run_task, task_model_config  # noqa: E402
from revival.layers.slstm_layer import SLSTMLayer, powerlaw_forget_bias  # noqa: E402
from revival.models import LanguageModel  # noqa: E402
from revival.train.schedule import warmup_cosine  # noqa: E402

RECIPE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tasks",
                      "parity_gpu_curriculum.yaml")
TRAIN_BINS = ((3, 12), (13, 24), (25, 40))
TEST_BINS = ((40, 63), (64, 127), (128, 256))


def rows(data: TaskData, keep: torch.Tensor) -> TaskData:
    return TaskData(data.inputs[keep], data.targets[keep], data.lengths[keep], data.vocab_size, data.chance)


def by_length(model, data: TaskData, bins) -> dict[str, float]:
    """Accuracy per bin of bit-string lengths (lengths counts the QUERY token too)."""
    bits = data.lengths - 1
    return {f"{lo}-{hi}": accuracy(model, rows(data, (bits >= lo) & (bits <= hi)), 128)["accuracy"]
            for lo, hi in bins if ((bits >= lo) & (bits <= hi)).any()}


def set_forget_bias(model: LanguageModel, spec: str) -> None:
    """spec "powerlaw" (the layer's init, left alone), "block0" (every sLSTM block gets block 0's power law, the
    exponent 0.3), "blocklast" (every one gets the last block's, exponent 1.6) or a number (that bias on every unit)."""
    if spec == "powerlaw":
        return
    layers = [block.mixer for block in model.blocks if isinstance(block.mixer, SLSTMLayer)]
    for layer in layers:
        if spec in ("block0", "blocklast"):
            index = 0 if spec == "block0" else max(1, len(model.blocks) - 1)
            value = powerlaw_forget_bias(layer.head_dim, index, max(2, len(model.blocks)) if index else 1)
        else:
            value = torch.full((layer.head_dim,), float(spec), dtype=torch.float64)
        with torch.no_grad():
            layer.gate_bias[1].copy_(value.to(layer.gate_bias.dtype).expand(layer.num_heads, -1))


def build_model(args, vocab_size: int, recipe) -> LanguageModel:
    options = {key: dict(value) for key, value in recipe.layer_options.items()}
    if args.slstm_heads is not None:
        options.setdefault("s", {})["num_heads"] = args.slstm_heads
    config = task_model_config(args.preset, vocab_size, recipe.d_models[0], recipe.num_blocks, options)
    if args.mlstm_heads is not None:  # config.num_heads is the mLSTM's; the sLSTM's stays as it was
        s_options = {**config.layer_options.get("s", {})}
        s_options.setdefault("num_heads", config.slstm_num_heads or config.num_heads)
        config = config.replace(num_heads=args.mlstm_heads, layer_options={**config.layer_options, "s": s_options})
    if args.pattern is not None:
        config = config.replace(pattern=args.pattern)
    torch.manual_seed(args.seed)
    model = LanguageModel(config)
    set_forget_bias(model, args.forget_bias)
    return model


def stage_schedule(args, recipe) -> list[tuple[int | None, int]]:
    """[(max_length or None for the full split, steps)], as revival.eval.tasks._train_in_stages splits them."""
    stages = [*args.curriculum, None]
    per_stage = [args.steps // len(stages)] * len(stages)
    per_stage[-1] += args.steps - sum(per_stage)
    return list(zip(stages, per_stage))


def train(args, recipe, train_split: TaskData, test: TaskData, probe: TaskData, held_out: TaskData) -> dict:
    model = build_model(args, max(train_split.vocab_size, test.vocab_size), recipe)
    log, checks, done, start, stop, last_loss = [], [], 0, time.perf_counter(), None, math.nan
    for index, (max_length, stage_steps) in enumerate(stage_schedule(args, recipe)):
        stage_train = train_split if max_length is None else generate(
            "parity", **{**recipe.train_data, "max_length": max_length,
                         "seed": recipe.train_data.get("seed", 0) + 1000 * (index + 1)})
        if index == 0 or args.schedule == "per-stage":  # run_task: a fresh AdamW and warmup + cosine per stage
            decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
            no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
            optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
            total = stage_steps if args.schedule == "per-stage" else args.steps
            warmup = min(args.warmup, total // 2)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step, total=total, warm=warmup: warmup_cosine(step, warm, total, 0.1))
        generator = torch.Generator().manual_seed(args.seed + index)
        order, cursor = torch.randperm(len(stage_train), generator=generator), 0
        window = {"loss": 0.0, "right": 0, "scored": 0, "count": 0, "grad_norm": 0.0}
        model.train()
        for step in range(1, stage_steps + 1):
            if cursor + recipe.batch_size > len(stage_train):
                order, cursor = torch.randperm(len(stage_train), generator=generator), 0
            batch = order[cursor : cursor + recipe.batch_size]
            cursor += recipe.batch_size
            inputs, targets = _batch(stage_train, batch, model.device)
            logits, _ = model(inputs)  # _scored_loss's computation (CPU: no autocast), keeping the logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else math.inf)
            optimizer.step()
            scheduler.step()
            scored = targets != IGNORE  # the batch's accuracy, from this step's forward (before the update)
            window["right"] += int(((logits.detach().argmax(-1) == targets) & scored).sum())
            window["scored"] += int(scored.sum())
            last_loss = float(loss.detach())
            window["loss"] += last_loss
            window["grad_norm"] = max(window["grad_norm"], float(norm))
            window["count"] += 1
            global_step = done + step
            if not math.isfinite(last_loss):
                stop = f"non-finite loss at step {global_step}"
                break
            if global_step % args.log_every == 0:
                log.append({"step": global_step, "stage_max_length": max_length or recipe.train_data["max_length"],
                            "loss": window["loss"] / window["count"], "accuracy": window["right"] / window["scored"],
                            "max_grad_norm": window["grad_norm"],
                            "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - start})
                window = {"loss": 0.0, "right": 0, "scored": 0, "count": 0, "grad_norm": 0.0}
            # run_task's checks (inside a stage, with the early stop), plus one at each stage's end (no stop there)
            inside = args.eval_every and step % args.eval_every == 0 and step < stage_steps
            if inside or (args.eval_every and step == stage_steps):
                probe_accuracy = accuracy(model, probe, 64)["accuracy"]
                check = {"step": global_step, "stage_end": not inside, "test_probe": probe_accuracy,
                         "train_by_length": by_length(model, held_out, TRAIN_BINS),
                         "test_by_length": by_length(model, probe, TEST_BINS)}
                if inside and probe_accuracy >= recipe.early_stop_accuracy:
                    check["test_full"] = accuracy(model, test, 64)["accuracy"]
                checks.append(check)
                print(json.dumps(check), flush=True)
                if check.get("test_full", 0.0) >= recipe.early_stop_accuracy:
                    stop = f"0.99 reached at step {global_step}"
                    break
        done += step
        if stop:
            break
    final = accuracy(model, test, 64, length_bins=8)
    return {"steps": done, "stop": stop or "all steps", "seconds": time.perf_counter() - start, "last_loss": last_loss,
            "accuracy": final["accuracy"], "accuracy_by_length": final["accuracy_by_length"],
            "train_by_length": by_length(model, held_out, TRAIN_BINS), "log": log, "checks": checks,
            "pattern": model.config.pattern, "parameters": model.num_parameters(),
            "heads": [b.mixer.num_heads for b in model.blocks]}


def run_name(args) -> str:
    changes = [f"{flag}{getattr(args, name)}" for name, flag in (
        ("lr", "lr"), ("clip", "clip"), ("warmup", "warmup"), ("steps", "steps"), ("slstm_heads", "sheads"),
        ("mlstm_heads", "mheads"), ("forget_bias", "fb"), ("pattern", "pattern"), ("schedule", "schedule"))
        if getattr(args, name) != DEFAULTS[name]]
    if tuple(args.curriculum) != DEFAULTS["curriculum"]:
        changes.append("cur" + "-".join(map(str, args.curriculum)))
    return "_".join([args.preset.replace("[", "").replace("]", "").replace(":", "-"), *changes, f"seed{args.seed}"])


def table(folder: Path) -> str:
    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["name"].rsplit("_seed", 1)[0], []).append(run)
    lines = ["| run | seeds >= 0.99 | per seed: test 40-256 (steps; train 25-40) |", "|---|---|---|"]
    for name, members in groups.items():
        members.sort(key=lambda r: r["args"]["seed"])
        cells = "; ".join(f"{r['args']['seed']}: {r['accuracy']:.3f} ({r['steps']}; "
                          f"{r['train_by_length'].get('25-40', float('nan')):.2f})" for r in members)
        good = sum(r["accuracy"] >= 0.99 for r in members)
        lines.append(f"| {name} | {good} / {len(members)} | {cells} |")
    return "\n".join(lines)


DEFAULTS: dict = {}


def main() -> None:
    recipe = load_recipe(RECIPE)
    DEFAULTS.update(lr=recipe.lrs[0], clip=1.0, warmup=recipe.warmup_steps, steps=recipe.steps, slstm_heads=None,
                    mlstm_heads=None, schedule="per-stage", forget_bias="powerlaw", pattern=None,
                    curriculum=tuple(recipe.curriculum))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xlstm[1:1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="folder for <name>.json")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--clip", type=float, default=DEFAULTS["clip"], help="gradient-norm clip (0: none)")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="warmup steps of each stage")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="all stages together, split evenly")
    parser.add_argument("--curriculum", type=lambda s: [int(v) for v in s.split(",") if v], default=list(
        DEFAULTS["curriculum"]), help="max lengths of the stages before the 3-40 one, e.g. 12,24 ('' : none)")
    parser.add_argument("--schedule", choices=("per-stage", "whole"), default="per-stage",
                        help="per-stage: run_task's fresh AdamW + warmup/cosine per stage; whole: one over all stages")
    parser.add_argument("--slstm-heads", type=int, default=None, help="sLSTM heads (default: the preset's, 4)")
    parser.add_argument("--mlstm-heads", type=int, default=None, help="mLSTM heads (default: the preset's, 4)")
    parser.add_argument("--forget-bias", default="powerlaw", help="powerlaw | block0 | blocklast | a number")
    parser.add_argument("--pattern", default=None, help="block letters replacing the preset's, e.g. sm")
    parser.add_argument("--eval-every", type=int, default=recipe.eval_every)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--probe-test", type=int, default=1000, help="test examples of the checks during training")
    parser.add_argument("--smoke", action="store_true", help="tiny data and 30 steps: checks the script runs")
    parser.add_argument("--check", action="store_true",
                        help="also run revival.eval.tasks.run_task on the same short schedule; assert equal losses")
    parser.add_argument("--table", metavar="DIR", help="print the seeds x result table of the runs in DIR and exit")
    args = parser.parse_args()
    if args.table:
        print(table(Path(args.table)))
        return
    if not args.out:
        parser.error("--out: required (a folder for the run's JSON)")
    if args.smoke:
        recipe = dataclasses.replace(recipe, train_data={**recipe.train_data, "num_examples": 400},
                                     test_data={**recipe.test_data, "num_examples": 40, "max_length": 64})
        args.steps, args.eval_every, args.log_every, args.probe_test = 30, 5, 5, 20
    train_split = generate("parity", **recipe.train_data)
    test = generate("parity", **{**recipe.train_data, **recipe.test_data})
    held_out = generate("parity", **{**recipe.train_data, "num_examples": 1000, "seed": 7})
    probe = rows(test, torch.arange(len(test)) < args.probe_test)
    result = train(args, recipe, train_split, test, probe, held_out)
    name = run_name(args)
    result = {"name": name, "args": vars(args), "recipe": RECIPE, **result}
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "checks")}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    if args.check:
        if args.eval_every:
            parser.error("--check: needs --eval-every 0 (run_task is run without checks or early stop)")
        check_against_run_task(args, recipe, result)


def check_against_run_task(args, recipe, result: dict) -> None:
    """run_task on the same schedule must end at this run's last loss (run with --eval-every 0: no early stop)."""
    short = dataclasses.replace(recipe, steps=args.steps, curriculum=tuple(args.curriculum), eval_every=0,
                                lrs=(args.lr,), warmup_steps=args.warmup, max_seconds=None)
    reference = run_task(short, [args.preset], device="cpu", seed=args.seed, show_progress=False, print_fn=None)
    theirs = reference["runs"][0]
    print(f"check: last loss run_task {theirs['final_loss']:.8f} / here {result['last_loss']:.8f}; test accuracy "
          f"run_task {theirs['accuracy']:.4f} / here {result['accuracy']:.4f}")
    if theirs["final_loss"] != result["last_loss"] or theirs["accuracy"] != result["accuracy"]:
        raise SystemExit("check: this loop and revival.eval.tasks.run_task disagree")


if __name__ == "__main__":
    main()
