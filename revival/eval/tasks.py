"""Train presets on the synthetic tasks of `revival.data.tasks` and measure their accuracy: `revival eval task`.

    from revival.eval.tasks import recipe, run_task
    result = run_task(recipe("parity", "tiny"), models=["xlstm[1:1]", "llama"], device="cpu")
    result["table"]   # one row per (model, setting, d_model): the accuracy of the best learning rate

A `TaskRecipe` is the whole experiment: the generator's arguments for the train and the test split, the settings
that vary (one table column each, e.g. MQAR's (seq_len, num_kv_pairs) pairs), the model widths and learning rates
swept, and the training schedule. Every (model, setting, d_model, lr) is one run: a fresh model
(`task_model_config`) trained with AdamW, warmup + cosine, on the cross-entropy of the scored positions only, then
evaluated on the test split. `RECIPES` holds two sizes per task: "paper" (the papers' setups, for a GPU; the same
values as configs/tasks/<task>.yaml) and "tiny" (CPU, about a minute for a few models; a check that everything runs,
too short to separate the models).

Accuracy: the fraction of scored positions whose argmax over the whole vocabulary is the target (Zoology's MQAR
accuracy; for the formal languages, one answer per example). `scaled_accuracy` = (accuracy - chance) / (1 - chance),
the xLSTM paper's scaling (0: guessing, 1: always right).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from ..data.tasks import GENERATORS, IGNORE, TaskData, generate
from ..devices import resolve_device
from ..errors import UserError, reject_unknown
from ..models import LanguageModel, ModelConfig, preset_config
from ..train.schedule import warmup_cosine

__all__ = ["RECIPES", "SIZES", "TaskRecipe", "accuracy", "format_table", "load_recipe", "minimum_depth", "plot_task",
           "recipe", "run_task", "task_model_config", "train_on_task"]

SIZES = ("tiny", "paper")
TRAIN_KEYS = ("steps", "batch_size")  # keys a setting may carry besides the generator's arguments


@dataclass(frozen=True)
class TaskRecipe:
    """One experiment on a task (see the module docstring). A setting's `steps` / `batch_size` override the
    recipe's for that setting (Zoology's batch size falls with the sequence length)."""

    task: str  # a key of revival.data.tasks.GENERATORS
    train_data: dict[str, Any]  # generator arguments of the training split (num_examples, seed, lengths, ...)
    test_data: dict[str, Any]  # generator arguments of the test split that differ from train_data
    settings: tuple[dict[str, Any], ...] = ({},)  # generator arguments varied: one table column each
    d_models: tuple[int, ...] = (64,)
    lrs: tuple[float, ...] = (1e-3,)
    num_blocks: int = 2
    steps: int = 1000
    batch_size: int = 64
    weight_decay: float = 0.1
    warmup_steps: int = 100
    eval_every: int = 0  # evaluate on the test split every this many steps (0: only at the end)
    early_stop_accuracy: float | None = None  # stop a run once its test accuracy reaches this (Zoology: 0.99)
    max_seconds: float | None = None  # stop a run after the step that passes this wall time (a CPU budget)
    layer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per pattern letter, as in ModelConfig
    # a length curriculum for the formal languages: max_length of the training stages before the last (which trains
    # on train_data itself); the steps split evenly over the stages, each with its own warmup + cosine (empty: none)
    curriculum: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in GENERATORS:
            raise UserError(f"task: expected one of {list(GENERATORS)}, got {self.task!r}")
        for name in ("num_blocks", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}: expected a positive integer, got {value!r}")
        if self.max_seconds is not None and (isinstance(self.max_seconds, bool) or
                                             not isinstance(self.max_seconds, (int, float)) or self.max_seconds <= 0):
            raise UserError(f"max_seconds: expected a positive number of seconds or null, got {self.max_seconds!r}")
        if not self.d_models or not self.lrs or not self.settings:
            raise UserError("d_models, lrs, settings: expected at least one value each")
        for setting in self.settings:
            if not isinstance(setting, dict):
                raise UserError(f"settings: expected a list of mappings, got {setting!r}")
        if self.curriculum:
            low, high = self.train_data.get("min_length"), self.train_data.get("max_length")
            if low is None or high is None:
                raise UserError(f"curriculum: needs a task with lengths (train_data min_length / max_length), got "
                                f"task {self.task!r}")
            stages = list(self.curriculum)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in stages) or \
                    stages != sorted(set(stages)) or stages[0] < low or stages[-1] >= high:
                raise UserError(f"curriculum: expected increasing integer max lengths in [{low}, {high}) "
                                f"(train_data's min_length, max_length), got {stages}")
            if self.steps < len(stages) + 1:
                raise UserError(f"steps: expected at least one step per curriculum stage ({len(stages) + 1}), got "
                                f"{self.steps}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TaskRecipe:
        if not isinstance(raw, dict):
            raise UserError(f"recipe: expected a mapping, got {type(raw).__name__}")
        reject_unknown(raw, [f.name for f in dataclasses.fields(cls)], "recipe", error=UserError)
        raw = dict(raw)
        for name in ("settings", "d_models", "lrs", "curriculum"):
            if name in raw:
                raw[name] = tuple(raw[name])
        if "lrs" in raw:
            raw["lrs"] = tuple(float(lr) for lr in raw["lrs"])
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("settings", "d_models", "lrs", "curriculum"):
            d[name] = list(d[name])
        return d

    def setting_label(self, setting: dict[str, Any]) -> str:
        return ", ".join(f"{key}={value}" for key, value in setting.items() if key not in TRAIN_KEYS) or self.task


# ------------------------------------------------------------------------------------------------------- recipes
_FORMAL_PAPER = dict(  # the xLSTM paper's formal-language setup: 2 blocks, d=64, train lengths 3-40, test 40-256
    train_data=dict(num_examples=100_000, min_length=3, max_length=40, seed=0),
    test_data=dict(num_examples=3_000, min_length=40, max_length=256, seed=1),
    d_models=(64,), lrs=(1e-3, 1e-4), num_blocks=2, steps=20_000, batch_size=256, warmup_steps=500,
    eval_every=2_000)
_FORMAL_TINY = dict(
    train_data=dict(num_examples=2_000, min_length=3, max_length=12, seed=0),
    test_data=dict(num_examples=200, min_length=12, max_length=24, seed=1),
    d_models=(32,), lrs=(3e-3,), num_blocks=2, steps=60, batch_size=32, warmup_steps=10)

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "mqar": {  # Zoology (Arora et al. 2023), figure 2: 64 epochs of 100k examples, lr sweep logspace(-4, -2, 4)
        "paper": dict(
            task="mqar", train_data=dict(vocab_size=8192, num_examples=100_000, power_a=0.01, seed=0),
            test_data=dict(num_examples=3_000, seed=1),
            settings=(dict(seq_len=64, num_kv_pairs=4, batch_size=512, steps=12_500),
                      dict(seq_len=128, num_kv_pairs=8, batch_size=512, steps=12_500),
                      dict(seq_len=256, num_kv_pairs=16, batch_size=256, steps=25_000),
                      dict(seq_len=512, num_kv_pairs=64, batch_size=128, steps=50_000)),
            d_models=(64, 128, 256, 512), lrs=(1e-4, 4.641588833612782e-4, 2.1544346900318843e-3, 1e-2),
            num_blocks=2, steps=12_500, batch_size=512, warmup_steps=500, eval_every=1_000,
            early_stop_accuracy=0.99),
        "tiny": dict(
            task="mqar", train_data=dict(vocab_size=128, num_examples=2_000, seed=0),
            test_data=dict(num_examples=200, seed=1), settings=(dict(seq_len=32, num_kv_pairs=4),),
            d_models=(32,), lrs=(3e-3,), num_blocks=2, steps=60, batch_size=32, warmup_steps=10),
    },
    "parity": {"paper": dict(task="parity", **_FORMAL_PAPER), "tiny": dict(task="parity", **_FORMAL_TINY)},
    "modular_arithmetic": {"paper": dict(task="modular_arithmetic", **_FORMAL_PAPER),
                           "tiny": dict(task="modular_arithmetic", **_FORMAL_TINY)},
    "bracket_matching": {"paper": dict(task="bracket_matching", **_FORMAL_PAPER),
                         "tiny": dict(task="bracket_matching", **_FORMAL_TINY)},
    "selective_copying": {  # Mamba (Gu & Dao 2023): length 4096, 16 tokens of 16 symbols, 2 layers (400k steps there)
        "paper": dict(
            task="selective_copying", train_data=dict(num_examples=100_000, seq_len=4096, num_tokens=16,
                                                      num_symbols=16, seed=0),
            test_data=dict(num_examples=1_000, seed=1), d_models=(64,), lrs=(1e-3,), num_blocks=2, steps=40_000,
            batch_size=64, warmup_steps=500, eval_every=4_000, early_stop_accuracy=0.99),
        "tiny": dict(
            task="selective_copying", train_data=dict(num_examples=2_000, seq_len=32, num_tokens=4, num_symbols=8,
                                                      seed=0),
            test_data=dict(num_examples=200, seed=1), d_models=(32,), lrs=(3e-3,), num_blocks=2, steps=60,
            batch_size=32, warmup_steps=10),
    },
}


def recipe(task: str, size: str = "tiny") -> TaskRecipe:
    """The built-in recipe of `task` at `size` ("tiny" or "paper")."""
    if task not in RECIPES:
        raise UserError(f"task: expected one of {list(RECIPES)}, got {task!r}")
    if size not in SIZES:
        raise UserError(f"--size: expected one of {list(SIZES)}, got {size!r}")
    return TaskRecipe.from_dict(RECIPES[task][size])


def load_recipe(path: str | Path) -> TaskRecipe:
    """A recipe from a YAML file (the keys of `TaskRecipe`, e.g. configs/tasks/mqar.yaml)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config: no such file {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"--config: {str(path)!r} is not valid YAML ({' '.join(str(error).split())})") from None
    return TaskRecipe.from_dict(raw)


# -------------------------------------------------------------------------------------------------------- models
def minimum_depth(preset: str, num_blocks: int) -> int:
    """`num_blocks`, or the smallest depth above it whose pattern holds every block kind of the preset (a hybrid)."""
    letters = set(preset_config(preset).pattern)
    depth = num_blocks
    while set(preset_config(preset, num_blocks=depth).pattern) != letters:
        depth += 1
    return depth


def task_model_config(preset: str, vocab_size: int, d_model: int, num_blocks: int = 2,
                      layer_options: dict[str, dict[str, Any]] | None = None) -> ModelConfig:
    """`preset` at a task's size: `num_blocks` blocks (more for a hybrid whose kinds need more), `d_model`, the
    task's vocabulary; the preset's head count, lowered until head_dim = d_model / num_heads is an even integer."""
    try:
        heads = preset_config(preset).num_heads
        while heads > 1 and (d_model % heads or (d_model // heads) % 2):
            heads -= 1
        letters = set(preset_config(preset).pattern)
        options = {letter: dict(values) for letter, values in (layer_options or {}).items() if letter in letters}
        return preset_config(preset, vocab_size=vocab_size, d_model=d_model, num_heads=heads,
                             num_blocks=minimum_depth(preset, num_blocks), layer_options=options)
    except ValueError as error:
        raise UserError(f"--models: {preset!r}: {error}") from None


# ------------------------------------------------------------------------------------------------ train, measure
def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _scored_loss(model: LanguageModel, inputs: torch.Tensor, targets: torch.Tensor, device) -> torch.Tensor:
    with _autocast(device):
        logits, _ = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


def _batch(data: TaskData, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` cut to their longest example (the rest is padding)."""
    length = int(data.lengths[index].max())
    return data.inputs[index, :length].to(device), data.targets[index, :length].to(device)


@torch.no_grad()
def accuracy(model: LanguageModel, data: TaskData, batch_size: int = 64, device: torch.device | None = None,
             length_bins: int = 0) -> dict[str, Any]:
    """{"accuracy", "sequence_accuracy" (every scored position right), "scaled_accuracy", "scored"}; with
    `length_bins` > 0 also "accuracy_by_length": {"lo-hi": accuracy} over equal-width bins of the example lengths."""
    device = model.device if device is None else device
    was_training = model.training
    model.eval()
    correct_rows, scored_rows = [], []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(start + batch_size, len(data)))
        inputs, targets = _batch(data, index, device)
        with _autocast(device):
            logits, _ = model(inputs)
        scored = targets != IGNORE
        right = (logits.argmax(-1) == targets) & scored
        correct_rows.append(right.sum(1).cpu())
        scored_rows.append(scored.sum(1).cpu())
    model.train(was_training)
    correct, scored = torch.cat(correct_rows), torch.cat(scored_rows)
    value = float(correct.sum() / scored.sum())
    result: dict[str, Any] = {
        "accuracy": value, "sequence_accuracy": float((correct == scored).float().mean()),
        "scaled_accuracy": (value - data.chance) / (1 - data.chance), "scored": int(scored.sum())}
    if length_bins > 0:
        lo, hi = int(data.lengths.min()), int(data.lengths.max())
        edges = torch.linspace(lo, hi + 1, length_bins + 1).floor().long().unique()
        by_length = {}
        for left, right_edge in zip(edges[:-1].tolist(), edges[1:].tolist()):
            rows = (data.lengths >= left) & (data.lengths < right_edge)
            if rows.any():
                by_length[f"{left}-{right_edge - 1}"] = float(correct[rows].sum() / scored[rows].sum())
        result["accuracy_by_length"] = by_length
    return result


def train_on_task(model: LanguageModel, train: TaskData, test: TaskData, *, steps: int, batch_size: int, lr: float,
                  weight_decay: float = 0.1, warmup_steps: int = 100, eval_every: int = 0,
                  early_stop_accuracy: float | None = None, seed: int = 0, progress=None,
                  max_seconds: float | None = None) -> dict[str, Any]:
    """Train `model` in place on `train` (AdamW, warmup + cosine to 0.1 lr, clip 1.0, batches drawn by a seeded
    permutation per epoch); returns {"steps" (done), "final_loss", "seconds", "stopped_by_time", "history": the
    learning curve, one {"step", "seconds" (wall since the start, evaluations included), "loss" (that step's batch),
    "accuracy" (test)} per `eval_every` steps}.
    `max_seconds` stops after the step that passes it (a time budget; steps then < `steps`)."""
    device = model.device
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    no_decay = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, min(warmup_steps, steps // 2), steps, 0.1))
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(train), generator=generator), 0
    history, loss_value, start, step, stopped_by_time = [], float("nan"), time.perf_counter(), 0, False
    model.train()
    for step in range(1, steps + 1):
        if cursor + batch_size > len(train):
            order, cursor = torch.randperm(len(train), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        inputs, targets = _batch(train, index, device)
        loss = _scored_loss(model, inputs, targets, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if progress is not None:
            progress.update(1)
        if step % 10 == 0 or step == steps:
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                break
        if eval_every and step % eval_every == 0 and step < steps:
            measured = accuracy(model, test, batch_size)["accuracy"]
            history.append({"step": step, "seconds": time.perf_counter() - start, "loss": float(loss.detach()),
                            "accuracy": measured})
            if early_stop_accuracy is not None and measured >= early_stop_accuracy:
                if progress is not None:
                    progress.update(steps - step)
                break
        if max_seconds is not None and time.perf_counter() - start > max_seconds and step < steps:
            loss_value, stopped_by_time = float(loss.detach()), True
            break
    return {"steps": step, "final_loss": loss_value, "seconds": time.perf_counter() - start, "history": history,
            "stopped_by_time": stopped_by_time}


def run_task(task_recipe: TaskRecipe, models: list[str], device: str | torch.device = "auto", seed: int = 0,
             show_progress: bool = True, print_fn=print) -> dict[str, Any]:
    """Every run of `task_recipe` for each preset in `models` (see the module docstring); returns the JSON-ready
    result: {"task", "recipe", "device", "runs": [...], "table": [...]} (table: the best lr per model, setting and
    d_model)."""
    if not models:
        raise UserError("--models: expected at least one preset name")
    device = resolve_device(device, argument="--device")
    total_steps = sum(setting.get("steps", task_recipe.steps) for setting in task_recipe.settings) * \
        len(task_recipe.d_models) * len(task_recipe.lrs) * len(models)
    progress = tqdm(total=total_steps, desc=f"task {task_recipe.task}", unit="step", disable=not show_progress)
    runs = []
    for setting in task_recipe.settings:
        data_args = {key: value for key, value in setting.items() if key not in TRAIN_KEYS}
        steps = int(setting.get("steps", task_recipe.steps))
        batch_size = int(setting.get("batch_size", task_recipe.batch_size))
        try:
            train = generate(task_recipe.task, **{**task_recipe.train_data, **data_args})
            test = generate(task_recipe.task, **{**task_recipe.train_data, **data_args, **task_recipe.test_data})
        except ValueError as error:
            raise UserError(f"recipe of {task_recipe.task}: {error}") from None
        variable_length = bool((test.lengths != test.lengths[0]).any())
        for preset in models:
            for d_model in task_recipe.d_models:
                config = task_model_config(preset, max(train.vocab_size, test.vocab_size), d_model,
                                           task_recipe.num_blocks, task_recipe.layer_options)
                for lr in task_recipe.lrs:
                    torch.manual_seed(seed)
                    model = LanguageModel(config).to(device)
                    trained = _train_in_stages(task_recipe, data_args, model, train, test, steps, batch_size, lr,
                                               seed, progress)
                    measured = accuracy(model, test, max(1, min(batch_size, 256)),
                                        length_bins=8 if variable_length else 0)
                    runs.append({"model": preset, "pattern": config.pattern, "setting": task_recipe.setting_label(
                        setting), "d_model": d_model, "lr": lr, "parameters": model.num_parameters(), **trained,
                        "train_accuracy": accuracy(model, _head(train, 1000), 256)["accuracy"], **measured})
                    progress.set_postfix(model=preset, accuracy=f"{measured['accuracy']:.3f}")
    progress.close()
    table = _best_per_lr(runs)
    return {"task": task_recipe.task, "recipe": task_recipe.to_dict(), "device": str(device),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "models": list(models),
            "runs": runs, "table": table}


def _train_in_stages(task_recipe: TaskRecipe, data_args: dict, model, train: TaskData, test: TaskData, steps: int,
                     batch_size: int, lr: float, seed: int, progress) -> dict[str, Any]:
    """`train_on_task` once, or once per curriculum stage (shorter training lengths first, the last stage on `train`);
    the stages' histories are joined with global step numbers and the time budget is shared."""
    stages = [*task_recipe.curriculum, None]
    per_stage = [steps // len(stages)] * len(stages)
    per_stage[-1] += steps - sum(per_stage)
    joined: dict[str, Any] = {"steps": 0, "history": [], "seconds": 0.0, "stopped_by_time": False}
    done_stages = []
    for index, (max_length, stage_steps) in enumerate(zip(stages, per_stage)):
        stage_train = train if max_length is None else generate(
            task_recipe.task, **{**task_recipe.train_data, **data_args, "max_length": max_length,
                                 "seed": task_recipe.train_data.get("seed", 0) + 1000 * (index + 1)})
        budget = None if task_recipe.max_seconds is None else task_recipe.max_seconds - joined["seconds"]
        trained = train_on_task(model, stage_train, test, steps=stage_steps, batch_size=batch_size, lr=lr,
                                weight_decay=task_recipe.weight_decay, warmup_steps=task_recipe.warmup_steps,
                                eval_every=task_recipe.eval_every, early_stop_accuracy=task_recipe.early_stop_accuracy,
                                seed=seed + index, progress=progress, max_seconds=budget)
        joined["history"] += [{**point, "step": point["step"] + joined["steps"],
                               "seconds": point["seconds"] + joined["seconds"]} for point in trained["history"]]
        if task_recipe.curriculum:
            done_stages.append({"max_length": max_length or task_recipe.train_data["max_length"],
                                "longest_sequence": int(stage_train.lengths.max()), "steps": trained["steps"]})
        joined["steps"] += trained["steps"]
        joined["seconds"] += trained["seconds"]
        joined["final_loss"], joined["stopped_by_time"] = trained["final_loss"], trained["stopped_by_time"]
        if trained["steps"] < stage_steps:  # stopped by time, early stop or a non-finite loss: the run ends here
            if progress is not None:
                progress.update(sum(per_stage[index + 1:]))
            break
    if task_recipe.curriculum:
        joined["curriculum"] = done_stages  # per stage: its max_length, its longest training sequence, steps taken
    return joined


def _head(data: TaskData, count: int) -> TaskData:
    return TaskData(data.inputs[:count], data.targets[:count], data.lengths[:count], data.vocab_size, data.chance)


def _best_per_lr(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    best: dict[tuple, dict[str, Any]] = {}
    for run in runs:
        key = (run["model"], run["setting"], run["d_model"])
        if key not in best or run["accuracy"] > best[key]["accuracy"]:
            best[key] = run
    return [{key: run[key] for key in ("model", "setting", "d_model", "lr", "parameters", "accuracy",
                                       "scaled_accuracy", "sequence_accuracy")} for run in best.values()]


def format_table(result: dict[str, Any]) -> str:
    """The accuracy table as text: one row per model, one column per (setting, d_model)."""
    columns = list(dict.fromkeys((row["setting"], row["d_model"]) for row in result["table"]))
    cells = {(row["model"], row["setting"], row["d_model"]): row["accuracy"] for row in result["table"]}
    width = max([len(model) for model in result["models"]] + [5])
    headers = [f"{setting} d={d_model}" for setting, d_model in columns]
    lines = [" " * width + "  " + "  ".join(headers)]
    for model in result["models"]:
        values = [f"{cells[(model, *column)]:.3f}".rjust(len(header)) for column, header in zip(columns, headers)]
        lines.append(model.ljust(width) + "  " + "  ".join(values))
    return "\n".join(lines)


def plot_task(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy per model: against d_model for each setting (or one bar per model for a single width), against
    the test length where the test lengths vary, and against the training step where runs have a learning curve
    (the best lr's runs); written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row["setting"] for row in result["table"]))
    best = {(row["model"], row["setting"], row["d_model"], row["lr"]) for row in result["table"]}
    best_runs = [run for run in result["runs"] if (run["model"], run["setting"], run["d_model"], run["lr"]) in best]
    by_length = [run for run in best_runs if "accuracy_by_length" in run]
    curves = [run for run in best_runs if run.get("history")]
    panels = len(settings) + (1 if by_length else 0) + (1 if curves else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    for axis, setting in zip(axes[0], settings):
        rows = [row for row in result["table"] if row["setting"] == setting]
        widths = sorted({row["d_model"] for row in rows})
        for model in result["models"]:
            points = sorted((row["d_model"], row["accuracy"]) for row in rows if row["model"] == model)
            if len(widths) > 1:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
            else:
                axis.bar(model, points[0][1])
        if len(widths) > 1:
            axis.set_xscale("log", base=2)
            axis.set_xlabel("d_model")
        else:
            axis.tick_params(axis="x", labelrotation=30)
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("accuracy")
        axis.set_title(result["task"] if setting == result["task"] else f"{result['task']}: {setting}", fontsize=9)
    if by_length:
        axis = axes[0][len(settings)]
        for run in by_length:
            bins = run["accuracy_by_length"]
            centers = [sum(int(x) for x in label.split("-")) / 2 for label in bins]
            axis.plot(centers, list(bins.values()), marker=".", label=f"{run['model']} d={run['d_model']}")
        axis.set_xlabel("test length")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"{result['task']}: accuracy by length", fontsize=9)
    if curves:
        axis = axes[0][-1]
        for run in curves:
            steps = [point["step"] for point in run["history"]] + [run["steps"]]
            values = [point["accuracy"] for point in run["history"]] + [run["accuracy"]]
            axis.plot(steps, values, marker=".", label=f"{run['model']} d={run['d_model']}")
        axis.set_xlabel("training step")
        axis.set_ylabel("test accuracy")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"{result['task']}: learning curve", fontsize=9)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][-1].legend(handles, labels, fontsize=7)
    return save_figure(figure, path)


def save_figure(figure, path) -> Path:
    """Lay out `figure`, write it as a PNG at `path` (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

