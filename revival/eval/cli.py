"""`revival eval task NAME`: train presets on a synthetic task and report their accuracy (JSON + PNG + a table).

    revival eval task mqar --models xlstm[1:1],llama,mamba2 --size tiny
    revival eval task parity --models xlstm[1:1],llama --size paper --device cuda --out runs/tasks/parity
    revival eval task mqar --config configs/tasks/mqar.yaml --models gated-deltanet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError

DEFAULT_MODELS = "xlstm[1:1],llama,mamba2"


def add_arguments(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_command, non_negative_int
    from .tasks import RECIPES, SIZES

    task = add_command(
        subparsers, "eval task", help="train presets on a synthetic task (MQAR, parity, ...) and report accuracy",
        description="Train each preset of --models on a synthetic task of revival.data.tasks and measure its test "
        "accuracy (the best learning rate of the recipe's sweep per model, setting and width). Writes "
        "results.json (every run, the recipe, the device) and accuracy.png to --out. --size tiny runs on a CPU "
        "in about a minute and checks that everything works; --size paper is the papers' setup, for a GPU.",
        epilog="tasks: " + ", ".join(RECIPES) + "\nrecipes of the paper size: configs/tasks/<task>.yaml; docs/eval.md")
    task.add_argument("task", metavar="NAME", choices=list(RECIPES), help=", ".join(RECIPES))
    task.add_argument("--models", default=DEFAULT_MODELS,
                      help=f"comma-separated preset names (default: {DEFAULT_MODELS})")
    task.add_argument("--size", choices=SIZES, default="tiny", help="the built-in recipe (default: tiny)")
    task.add_argument("--config", default=None, help="a recipe YAML file instead of --size (keys of TaskRecipe)")
    task.add_argument("--out", default=None, help="output folder (default: runs/tasks/NAME-SIZE)")
    task.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    task.add_argument("--seed", type=non_negative_int, default=0, help="model initialisation and batch order seed")
    task.add_argument("--no-progress", action="store_true", help="no progress bar")
    task.set_defaults(handler=run)
    return task


def run(args: argparse.Namespace) -> int:
    from .tasks import format_table, load_recipe, plot_task, recipe, run_task

    task_recipe = load_recipe(args.config) if args.config else recipe(args.task, args.size)
    if task_recipe.task != args.task:
        raise UserError(f"--config: {args.config!r} is a recipe of task {task_recipe.task!r}, not {args.task!r}")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    label = Path(args.config).stem if args.config else args.size
    out = Path(args.out) if args.out else Path("runs") / "tasks" / f"{args.task}-{label}"
    result = run_task(task_recipe, models, device=args.device, seed=args.seed, show_progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    temporary = json_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(result, indent=1))
    temporary.replace(json_path)
    png = plot_task(result, out / "accuracy.png")
    print(f"task {args.task} ({label}) on {result['device']}: test accuracy, best learning rate per cell")
    print(format_table(result))
    print(f"wrote {json_path} and {png}")
    return 0
