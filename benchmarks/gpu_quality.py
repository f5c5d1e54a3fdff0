"""GPU quality study (issue 22): seven layouts at one parameter count on one corpus, plus MQAR, parity, extrapolation.

Run on a CUDA machine, a few models per call (each stage has a time cap, recorded when it stops a run; about 4 minutes
per model on an H200 at the defaults; the run plan is in docs/eval.md "The GPU study"):

    python benchmarks/gpu_quality.py --corpus PATH/tinyshakespeare.txt --models llama,mingru [--out DIR]

--out (default: $OUT, else runs/) holds gpu_quality.json: a run merges into it (the entries of --models replaced,
the other models' kept; the header's "models" records each entry's tree, date, device and command), so the seven
models can run over several device calls; the markdown table is built from the merged file. The file is rewritten
after every model through a temporary file and a rename (a run stopped from outside keeps what finished).

For each of xlstm-large, xlstm[7:1], llama, mingru, mamba2, gated-deltanet and hybrid:
  1. language modelling on the corpus (byte tokenizer; the last 10% of the file is the validation split): d_model
     256, the depth whose parameter count is closest to --params, the same steps x batch x context tokens for every
     model (AdamW, warmup + cosine, bf16 autocast); validation loss and bits per byte as `revival eval` computes them
     (revival.train.evaluate: state carried for recurrent models, windows of the context for attention) on the
     first 32k bytes of the validation split, as documents of 8 KiB.
  2. extrapolation of that model to 4x its training context on 32 rows from evenly spaced offsets of the validation
     split (revival.eval.extrapolate; "carried" = state carried / full attention, "window" = a fresh state reading
     at most the training context, every model): the headline is carried / window mean loss on the same targets
     beyond the training context (`beyond_ratio_to_window`); 4x / 1x of one mode compares different text.
  3. MQAR by the recipe --mqar-config (default configs/tasks/mqar_256_16.yaml: (seq_len 256, 16 key-value pairs),
     vocab 8192, d_model 128, 2 blocks, lr 2e-3, stop at 0.99 test accuracy), one run of revival.eval.tasks.run_task
     as `revival eval task mqar --config` runs it, its time cap replaced by --mqar-seconds.
  4. parity by the recipe --parity-config (default configs/tasks/parity_gpu_curriculum.yaml: 2 blocks, d_model 64,
     the length curriculum 3-12 / 3-24 / 3-40, test lengths 40-256), one run per seed of --parity-seeds (every
     seed reported), each capped at --parity-seconds.
Targets (issue 22): sLSTM-containing xLSTM >= 0.99 parity accuracy on 40-256 where llama fails; mLSTM/GDN >= 0.95
MQAR at (256,16) d=128; recurrent models' loss at 4x the training context <= 1.05x their loss at 1x (read here as
carried / window on the same targets beyond the context, docs/eval.md). The study's budgets (steps, time caps) are
far below the papers' (Zoology: 64 epochs of 100k examples and an lr sweep; xLSTM: longer parity training), so a
missed target here is the number measured at this budget, not the papers' result.
Each training stage starts with one forward + backward whose gradients are dropped (for the tasks: on a throwaway
model of the run's config, plus a forward on test-length rows), so kernels compile outside the time caps;
`stage_seconds` in the JSON (and a log line per stage as it ends) say where each model's time went.
`--smoke` runs the same flow at tiny sizes (the recipes shrunk by SMOKE_TASKS; CPU too) to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from revival.bench.report import environment, write_json  # noqa: E402
from revival.data import ByteTokenizer  # noqa: E402
from revival.data.tasks import generate  # noqa: E402
from revival.eval.extrapolate import extrapolate, spaced_rows  # noqa: E402
from revival.eval.tasks import TRAIN_KEYS, TaskRecipe, load_recipe, minimum_depth, run_task, task_model_config  # noqa: E402
from revival.models import LanguageModel, preset_config  # noqa: E402
from revival.train import evaluate  # noqa: E402
from revival.train.schedule import warmup_cosine  # noqa: E402

FORMAT = 2  # of gpu_quality.json: 2 = per-model entries with "mqar" / "parity" from the recipes (1: 7-second stages)
MODELS = ["xlstm-large", "xlstm[7:1]", "llama", "mingru", "mamba2", "gated-deltanet", "hybrid"]
RECIPES = {"mqar": os.path.join(ROOT, "configs", "tasks", "mqar_256_16.yaml"),
           "parity": os.path.join(ROOT, "configs", "tasks", "parity_gpu_curriculum.yaml")}
FULL = dict(params=4_000_000, d_model=256, context=256, batch=64, steps=600, lr=2e-3, lm_seconds=20,
            eval_tokens=32_768, extrapolate_rows=32)
SMOKE = dict(params=60_000, d_model=32, context=32, batch=4, steps=3, lr=2e-3, lm_seconds=30, eval_tokens=256,
             extrapolate_rows=2)
# --smoke: the task recipes at tiny sizes (TaskRecipe fields; train_data / test_data update the recipe's own), the
# curriculum and every other field kept, so the smoke run goes through the same stages; rows x length stay under 1024
# per forward so that no fused elementwise kernel turns on (under TRITON_INTERPRET=1, as in the tests, it is slow)
SMOKE_TASKS = {
    "mqar": dict(train_data=dict(vocab_size=256, num_examples=16), test_data=dict(num_examples=8),
                 settings=({"seq_len": 32, "num_kv_pairs": 4},), d_models=(32,), steps=4, batch_size=8,
                 warmup_steps=1, eval_every=2),
    "parity": dict(train_data=dict(num_examples=16), test_data=dict(num_examples=8, max_length=64), d_models=(32,),
                   steps=3, batch_size=8, warmup_steps=1, eval_every=2),
}


def autocast(device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def matched_config(preset: str, d_model: int, target: int, vocab_size: int):
    """The depth of `preset` at `d_model` whose parameter count is closest to `target` (at least the depth that holds
    each of its block kinds: a hybrid keeps its attention)."""
    heads = 4 if d_model >= 64 else 2
    best = None
    for depth in range(minimum_depth(preset, 1), 65):
        config = preset_config(preset, vocab_size=vocab_size, d_model=d_model, num_heads=heads, num_blocks=depth)
        with torch.device("meta"):
            count = LanguageModel(config).num_parameters()
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), config, count)
        if count > target:
            break
    return best[1], best[2]


def train_language_model(model, stream: torch.Tensor, settings: dict, device, seed: int) -> dict:
    """Random windows of context + 1 bytes from the training stream, AdamW + warmup/cosine, bf16 autocast."""
    context, batch, steps = settings["context"], settings["batch"], settings["steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps // 20, steps, 0.1))
    generator = torch.Generator().manual_seed(seed)
    start, losses, step = time.perf_counter(), [], 0
    model.train()
    for step in range(1, steps + 1):
        offsets = torch.randint(0, stream.numel() - context - 1, (batch,), generator=generator)
        rows = torch.stack([stream[o : o + context + 1] for o in offsets.tolist()]).to(device)
        with autocast(device):
            logits, _ = model(rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0 or step == steps:
            losses.append((step, float(loss.detach())))
            if time.perf_counter() - start > settings["lm_seconds"] and step < steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"steps": step, "steps_planned": steps, "stopped_by_time": step < steps,
            "tokens": step * batch * context, "seconds": time.perf_counter() - start, "train_losses": losses}


def warm_up(model, inputs: torch.Tensor, device) -> None:
    """One forward and backward on `inputs`, gradients dropped (the model is unchanged): kernels compile here, not
    inside a training loop's time cap (a fresh GPU machine compiles every Triton kernel on its first call)."""
    with autocast(device):
        logits, _ = model(inputs.to(device))
    logits.float().sum().backward()
    model.zero_grad(set_to_none=True)


class StageClock:
    """Records the seconds since the previous lap (after a CUDA synchronize) as `stages[name]` and prints them at
    once, so the log of a run stopped from outside shows the stage a model was in."""

    def __init__(self, label: str, stages: dict, device):
        self.label, self.stages, self.device, self.last = label, stages, device, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stages[name] = now - self.last
        self.last = now
        print(f"  {self.label} {name}: {self.stages[name]:.1f} s", flush=True)


def study_recipe(task: str, path: str, seconds: float, smoke: bool) -> TaskRecipe:
    """The recipe at `path` with its time cap replaced by `seconds` (and, for --smoke, SMOKE_TASKS' tiny sizes). The
    study runs one model per recipe and seed, so the recipe must hold one setting, one d_model and one lr."""
    base = load_recipe(path)
    if base.task != task:
        raise SystemExit(f"--{task}-config: {path!r} is a recipe of task {base.task!r}, expected {task!r}")
    changes = dict(SMOKE_TASKS[task]) if smoke else {}
    for name in ("train_data", "test_data"):
        if name in changes:
            changes[name] = {**getattr(base, name), **changes[name]}
    task_recipe = dataclasses.replace(base, max_seconds=seconds, **changes)
    counts = (len(task_recipe.settings), len(task_recipe.d_models), len(task_recipe.lrs))
    if counts != (1, 1, 1):
        raise SystemExit(f"--{task}-config: expected one setting, one d_model and one lr (one run per model), got "
                         f"{counts[0]} / {counts[1]} / {counts[2]} in {path!r}")
    return task_recipe


def warm_up_task(preset: str, task_recipe: TaskRecipe, device) -> None:
    """Compile `preset`'s kernels at the recipe's shapes before its capped run: forward + backward on one training
    batch and a forward on test rows (the longest sequences), on a throwaway model of the run's config."""
    setting = task_recipe.settings[0]
    data_args = {key: value for key, value in setting.items() if key not in TRAIN_KEYS}
    rows = {"num_examples": int(setting.get("batch_size", task_recipe.batch_size))}
    train = generate(task_recipe.task, **{**task_recipe.train_data, **data_args, **rows})
    test = generate(task_recipe.task, **{**task_recipe.train_data, **data_args, **task_recipe.test_data, **rows})
    config = task_model_config(preset, max(train.vocab_size, test.vocab_size), task_recipe.d_models[0],
                               task_recipe.num_blocks, task_recipe.layer_options)
    model = LanguageModel(config).to(device)
    warm_up(model, train.inputs, device)
    model.eval()
    with torch.no_grad(), autocast(device):
        model(test.inputs.to(device))


def task_run(preset: str, task_recipe: TaskRecipe, seed: int, device) -> dict:
    """One run of `task_recipe` for `preset`, as `revival eval task --config` runs it: fresh data, model (seeded by
    `seed`, as is the batch order), training, test accuracy (by length for the formal languages)."""
    result = run_task(task_recipe, [preset], device=device, seed=seed, show_progress=False)
    return {"seed": seed, **result["runs"][0]}


def run_model(preset: str, settings: dict, tasks: dict, parity_seeds: list[int], train_stream, validation_text: bytes,
              device, seed: int) -> dict:
    tokenizer = ByteTokenizer()
    out: dict = {"model": preset}
    stages = out["stage_seconds"] = {}  # wall time per stage (synchronized): where a slow model spends it
    clock = StageClock(preset, stages, device)
    torch.manual_seed(seed)
    config, count = matched_config(preset, settings["d_model"], settings["params"], tokenizer.vocab_size)
    model = LanguageModel(config).to(device)
    out.update(pattern=config.pattern, parameters=count)
    warm_up(model, train_stream[: settings["batch"] * settings["context"]].view(settings["batch"], -1), device)
    clock.lap("lm_warm_up")
    out["train"] = train_language_model(model, train_stream, settings, device, seed)
    clock.lap("lm_train")
    documents = [validation_text[i : i + 8192] for i in range(0, len(validation_text), 8192)]  # 8 KiB each
    result = evaluate(model, documents, tokenizer, settings["context"], device,
                      max_tokens=settings["eval_tokens"], autocast=lambda: autocast(device))
    out["validation"] = {"loss": result.loss, "bits_per_byte": result.bits_per_byte, "tokens": result.tokens}
    clock.lap("lm_validation")
    length = 4 * settings["context"] + 1
    validation_ids = torch.tensor(tokenizer.encode(validation_text), dtype=torch.long)
    sequences = spaced_rows(validation_ids, length, settings["extrapolate_rows"])
    out["extrapolation"] = extrapolate(model, sequences, settings["context"], [1, 2, 4], lambda: autocast(device))
    clock.lap("extrapolation")
    del model

    warm_up_task(preset, tasks["mqar"], device)
    clock.lap("mqar_warm_up")
    out["mqar"] = {"recipe": tasks["mqar"].to_dict(), **task_run(preset, tasks["mqar"], seed, device)}
    clock.lap("mqar_run")  # data generation + training + test
    warm_up_task(preset, tasks["parity"], device)
    clock.lap("parity_warm_up")
    runs = []
    for parity_seed in parity_seeds:  # every seed is reported, none picked
        runs.append(task_run(preset, tasks["parity"], parity_seed, device))
        clock.lap(f"parity_seed{parity_seed}")
    out["parity"] = {"recipe": tasks["parity"].to_dict(), "runs": runs,
                     "accuracy_by_seed": {str(run["seed"]): run["accuracy"] for run in runs}}
    return out


def task_cell(run: dict) -> str:
    stop = ", time cap" if run["stopped_by_time"] else ""
    return f"{run['accuracy']:.3f} ({run['steps']} steps{stop})"


def table(results: list[dict]) -> str:
    lines = ["| model | params | tokens | val loss | bits/byte | 4x carried / window | 4x/1x loss (carried) | "
             "4x/1x (window) | MQAR (256,16) d=128 | parity 40-256, each seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'].splitlines()[-1][:80]} |")
            continue
        extrapolation = r["extrapolation"]
        modes = extrapolation["modes"]
        window = f"{modes['window']['ratio_to_1x']['4x']:.3f}" if "window" in modes else "-"
        # carried / window on the same targets, those beyond the training context: the content-controlled ratio
        beyond = extrapolation.get("beyond_ratio_to_window", {}).get("4x")
        beyond = f"{beyond:.3f}" if beyond is not None else "-"
        parity = "; ".join(f"seed {run['seed']}: {task_cell(run)}" for run in r["parity"]["runs"])
        lines.append(
            f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['train']['tokens'] / 1e6:.1f}M"
            f"{' (time cap)' if r['train']['stopped_by_time'] else ''} | {r['validation']['loss']:.4f} | "
            f"{r['validation']['bits_per_byte']:.4f} | {beyond} | {modes['carried']['ratio_to_1x']['4x']:.3f} | "
            f"{window} | {task_cell(r['mqar'])} | {parity} |")
    return "\n".join(lines)


def plot(results: list[dict], folder: str) -> list[str]:
    """gpu_quality.png (per model: validation bits per byte, carried / window loss at 4x the context, MQAR accuracy,
    parity accuracy of each seed, with the issue's targets as dashed lines) and gpu_quality_extrapolation.png (loss by
    position and by context, every model and mode); models with an error are left out. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from revival.eval.extrapolate import plot_extrapolation
    from revival.eval.tasks import save_figure

    done = [r for r in results if "error" not in r]
    if not done:
        return []
    names = [r["model"] for r in done]
    figure, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = [
        ("validation bits / byte", [r["validation"]["bits_per_byte"] for r in done], None),
        ("4x context: carried / window loss", [r["extrapolation"].get("beyond_ratio_to_window", {}).get(
            "4x", float("nan")) for r in done], 1.05),  # nan: no bar where the table shows "-"
        ("MQAR (256, 16) accuracy", [r["mqar"]["accuracy"] for r in done], 0.95),
    ]
    for axis, (title, values, target) in zip(axes, panels):
        axis.bar(range(len(done)), values, color="tab:blue")
        if target is not None:
            axis.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        axis.set_title(title, fontsize=9)
    parity = axes[3]
    for index, r in enumerate(done):
        accuracies = [run["accuracy"] for run in r["parity"]["runs"]]
        parity.scatter([index] * len(accuracies), accuracies, color="tab:orange", zorder=3)
    parity.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
    parity.set_ylim(0.0, 1.05)
    parity.set_title("parity 40-256 accuracy, each seed", fontsize=9)
    for axis in axes:
        axis.set_xticks(range(len(done)), names, rotation=45, ha="right", fontsize=8)
    paths = [str(save_figure(figure, os.path.join(folder, "gpu_quality.png")))]
    curves = {r["model"]: r["extrapolation"] for r in done}
    paths.append(str(plot_extrapolation(curves, os.path.join(folder, "gpu_quality_extrapolation.png"))))
    return paths


def in_study_order(entries: dict[str, dict]) -> list[dict]:
    """MODELS' order first, then any other preset in the order it was added."""
    names = [m for m in MODELS if m in entries] + [m for m in entries if m not in MODELS]
    return [entries[name] for name in names]


def previous_study(path: str, header: dict, parser: argparse.ArgumentParser) -> dict:
    """The gpu_quality.json at `path` to merge into ({} if none); refused when its format, corpus or --smoke differ."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as handle:
            previous = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"--out: cannot read {path} to merge into ({error}); move it away or pick another --out")
    for key in ("format", "corpus", "corpus_bytes", "smoke"):
        if previous.get(key) != header[key]:
            parser.error(f"--out: {path} was written with {key} {previous.get(key)!r}, this run has {header[key]!r}; "
                         "results of the two would share one table: pick another --out")
    return previous


def write_study(path: str, header: dict, models: dict, entries: dict) -> None:
    results = in_study_order(entries)
    write_json({**header, "models": {r["model"]: models[r["model"]] for r in results if r["model"] in models},
                "results": results, "table": table(results)}, path)  # temporary file + rename: never half-written


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", help="a text file (tiny Shakespeare); required unless --plot-only")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"),
                        help="folder of gpu_quality.json, merged into if it exists (default: $OUT, else runs)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated presets (default: the seven)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script (CPU too)")
    parser.add_argument("--seed", type=int, default=0, help="LM and MQAR seed; parity runs seeds seed..seed+N-1")
    parser.add_argument("--budget-minutes", type=float, default=4.5,
                        help="models not started by then are skipped: recorded as such, an earlier entry kept "
                        "(default: 4.5, so two models at the default caps fit a 9-minute call)")
    parser.add_argument("--mqar-config", default=RECIPES["mqar"], help="MQAR recipe (default: %(default)s)")
    parser.add_argument("--parity-config", default=RECIPES["parity"], help="parity recipe (default: %(default)s)")
    parser.add_argument("--mqar-seconds", type=positive_seconds, default=75.0,
                        help="time cap of the MQAR run, replacing the recipe's (default: 75)")
    parser.add_argument("--parity-seconds", type=positive_seconds, default=40.0,
                        help="time cap of each parity seed's run, replacing the recipe's (default: 40)")
    parser.add_argument("--lm-seconds", type=positive_seconds, default=None,
                        help="time cap of the language-model stage, replacing the settings' (default: 20; a model "
                        "slower than 600 steps in 20 s, such as the sLSTM-containing xlstm[7:1], needs more for the "
                        "same tokens)")
    parser.add_argument("--parity-seeds", type=int, default=2, help="parity runs, one per seed (default: 2)")
    parser.add_argument("--tree", default=None,
                        help="the commit the code is at, recorded per model (default: git rev-parse HEAD, if any)")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: draw the plots of --out's gpu_quality.json (a run draws them too)")
    args = parser.parse_args(argv)
    if args.plot_only:
        path = os.path.join(args.out, "gpu_quality.json")
        if not os.path.exists(path):
            parser.error(f"--plot-only: no gpu_quality.json in --out {args.out!r}")
        with open(path) as handle:
            print("wrote", ", ".join(plot(json.load(handle)["results"], args.out)))
        return 0
    if args.corpus is None:
        parser.error("--corpus: required (a text file), unless --plot-only")
    if args.parity_seeds < 1:
        parser.error(f"--parity-seeds: expected at least 1, got {args.parity_seeds}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        parser.error(f"--models: expected at least one preset name, got {args.models!r}")
    settings = SMOKE if args.smoke else FULL
    if args.lm_seconds is not None:
        settings = dict(settings, lm_seconds=args.lm_seconds)
    tasks = {"mqar": study_recipe("mqar", args.mqar_config, args.mqar_seconds, args.smoke),
             "parity": study_recipe("parity", args.parity_config, args.parity_seconds, args.smoke)}
    parity_seeds = list(range(args.seed, args.seed + args.parity_seeds))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = open(args.corpus, "rb").read()
    split = int(len(data) * 0.9)
    train_stream = torch.tensor(ByteTokenizer().encode(data[:split]), dtype=torch.long)
    validation_text = data[split:]
    header = {"corpus": os.path.basename(args.corpus), "corpus_bytes": len(data), "validation_bytes": len(data) - split,
              "smoke": args.smoke, "format": FORMAT}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_quality.json")
    previous = previous_study(path, header, parser)
    entries = {r["model"]: r for r in previous.get("results", [])}
    model_records = dict(previous.get("models", {}))
    where = environment(device)
    tree = args.tree or where["versions"]["git_commit"]
    print(json.dumps({**header, "device": where["device"]["name"], "tree": tree, "settings": settings,
                      "mqar_seconds": args.mqar_seconds, "parity_seconds": args.parity_seconds,
                      "parity_seeds": parity_seeds, "merging_into": sorted(entries)}), flush=True)
    start = time.perf_counter()
    for preset in models:
        began = time.perf_counter()
        if began - start > 60 * args.budget_minutes:
            if preset in entries:  # an earlier run's result is kept, not replaced by a skip
                print(f"{preset}: skipped (budget spent); its earlier entry is kept", flush=True)
                continue
            result = {"model": preset, "error": f"skipped: the {args.budget_minutes} minute budget was spent"}
        else:
            try:
                result = run_model(preset, settings, tasks, parity_seeds, train_stream, validation_text, device,
                                   args.seed)
            except Exception:  # noqa: BLE001 - one model's failure is recorded, the others still run
                result = {"model": preset, "error": traceback.format_exc()}
            result["lm_settings"] = settings
        result["seconds_total"] = time.perf_counter() - began
        entries[preset] = result
        model_records[preset] = {"tree": tree, "git_dirty": where["versions"]["git_dirty"],
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": where["device"]["name"],
                                 "torch": torch.__version__, "seconds": result["seconds_total"],
                                 "command": " ".join(sys.argv if argv is None else ["gpu_quality.py", *argv])}
        print(f"{preset}: {result['seconds_total']:.0f} s", json.dumps(
            {k: v for k, v in result.items() if k in ("parameters", "validation", "error")}), flush=True)
        write_study(path, header, model_records, entries)  # after every model: a run stopped from outside keeps it
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ordered = in_study_order(entries)
    print(table(ordered))
    plots = plot(ordered, args.out)
    print(f"total {time.perf_counter() - start:.0f} s; wrote {', '.join([path, *plots])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
