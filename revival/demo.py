"""`revival demo`: an xLSTM and a Llama-style Transformer of the same parameter count, trained on CPU for the same
token budget on the embedded Python-stdlib corpus (byte tokenizer), compared side by side.

Steps: load the corpus; size every model after the first to the first model's parameter count (within 5%, by a small
search over width and depth with the real model classes); set the shared token budget (fixed with `tokens`, else from
a short timing of each model so that training fits in `minutes`); train each with `revival.train.Trainer`; evaluate on
the same validation documents; time sampling; print a table, a sample from each, and write `loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import load_corpus
from .data.tokenizers import ByteTokenizer
from .errors import UserError
from .generate.sampling import sample_next
from .models import LanguageModel, preset_config, state_bytes
from .models.model import format_count
from .train.config import DataConfig, RunConfig, TrainConfig
from .train.logging import plot_loss_curves
from .train.trainer import Trainer

# Demo sizes: "xlstm" is the reference, every other model is sized to its parameter count. xlstm[1:0] (all mLSTM)
# learned fastest per CPU second of the candidates tried (xlstm[1:0], xlstm[7:1], xlstm-large at d_model 96-128; 2
# cores, 40 s each): sLSTM steps are sequential, and the paper mLSTM block reached a lower loss per second.
DEMO_MODELS: dict[str, dict[str, Any]] = {
    "xlstm": {"preset": "xlstm[1:0]", "d_model": 128, "num_blocks": 4, "num_heads": 4},
    "llama": {"preset": "llama", "d_model": 128, "num_blocks": 4, "num_heads": 4},
}
CONTEXT_LENGTH = 256
BATCH_SIZE = 8
LEARNING_RATE = 3e-3
EVAL_DOC_MAX_BYTES = 16384  # the first 16 KB of each validation document, in corpus order ...
EVAL_MAX_TOKENS = 16000  # ... until this many tokens (the last one read to its end)
EVALS = 4  # validation points per run
GENERATE_TOKENS = 200
MATCH_TOLERANCE = 0.05


# ------------------------------------------------------------------------------------------------ model sizing
def count_parameters(preset: str, **overrides: Any) -> int:
    """Parameters of `preset_config(preset, **overrides)`, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        return LanguageModel(preset_config(preset, **overrides)).num_parameters()


def match_parameters(preset: str, target: int, overrides: dict[str, Any], vocab_size: int,
                     tolerance: float = MATCH_TOLERANCE) -> dict[str, Any]:
    """Width/depth overrides for `preset` whose parameter count is closest to `target`.

    Keeps the depth (`num_blocks`) if some width (a multiple of 2 * num_heads) lands within `tolerance`, else tries
    depths further and further away. Raises ValueError when nothing within `tolerance` is found.
    """
    overrides = dict(overrides)
    heads = overrides.get("num_heads", 4)
    step = 2 * heads * (2 if preset.startswith("xlstm-large") else 1)  # head dims even (RoPE; qk_dim_factor 0.5)
    depth = overrides.get("num_blocks", 4)
    best: tuple[float, dict[str, Any]] | None = None
    for delta in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        blocks = depth + delta
        if blocks < 1:
            continue
        for d_model in range(step, 2049, step):
            candidate = {**overrides, "d_model": d_model, "num_blocks": blocks, "vocab_size": vocab_size}
            params = count_parameters(preset, **candidate)
            error = abs(params - target) / target
            if best is None or error < best[0]:
                best = (error, candidate)
            if params > target * (1 + tolerance):
                break
        if best is not None and best[0] <= tolerance:
            return best[1]
    raise UserError(f"models: cannot size {preset!r} to {target:,} parameters within {tolerance:.0%} "
                     f"(closest: {best[1] if best else None})")


def demo_model_options(names: list[str], vocab_size: int) -> list[tuple[str, dict[str, Any]]]:
    """[(label, {"preset": ..., overrides...})]: the first model as given, the others sized to its parameter count."""
    if not names:
        raise UserError("models: expected at least one model name, e.g. 'xlstm,llama'")
    if not any(name.lower().startswith("xlstm") for name in names):
        raise UserError(f"models: the demo trains an xLSTM; expected 'xlstm' (or an xlstm preset) among {names}")
    if len(set(names)) != len(names):
        raise UserError(f"models: expected distinct names, got {names}")
    chosen = []
    target = None
    for name in names:
        base = dict(DEMO_MODELS.get(name, {**DEMO_MODELS["xlstm"], "preset": name}))
        preset = base.pop("preset")
        if target is None:
            options = {**base, "vocab_size": vocab_size}
            preset_config(preset, **options)  # validates the name
            target = count_parameters(preset, **options)
        else:
            options = match_parameters(preset, target, base, vocab_size)
        chosen.append((name, {"preset": preset, **options}))
    return chosen


# ------------------------------------------------------------------------------------------------ timing
def seconds_per_token(model_options: dict[str, Any], batch_size: int, context_length: int, repeats: int = 3) -> float:
    """Seconds per training token (forward, backward, AdamW step) of a fresh model: one warm-up step, then the median
    of `repeats`, plus 10% for what a real step adds (batching, clipping, logging)."""
    options = dict(model_options)
    model = LanguageModel(preset_config(options.pop("preset"), **options))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, context_length + 1))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        logits, _ = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return 1.1 * sorted(times[1:])[len(times[1:]) // 2] / (batch_size * context_length)


@torch.no_grad()
def time_generation(model: LanguageModel, prompt_ids: list[int], max_new_tokens: int, seed: int,
                    temperature: float = 0.8) -> dict[str, Any]:
    """Prefill the prompt, then sample one token per step carrying the state.

    Returns new ids, tokens/s (prefill included), state bytes at the end, and the state growth per token.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    new_ids: list[int] = []
    start = time.perf_counter()
    logits, state = model(ids)
    previous_bytes = state_bytes(state)
    for _ in range(max_new_tokens):
        token = sample_next(logits[:, -1], ids[:, :0], temperature=temperature, generator=generator)
        new_ids.append(int(token))
        previous_bytes = state_bytes(state)
        logits, state = model(token[:, None], state)
    elapsed = time.perf_counter() - start
    final_bytes = state_bytes(state)
    return {"ids": new_ids, "tokens_per_s": max_new_tokens / max(elapsed, 1e-9), "state_bytes": final_bytes,
            "state_growth_per_token": final_bytes - previous_bytes, "positions": len(prompt_ids) + max_new_tokens}


# ------------------------------------------------------------------------------------------------ the command
def add_arguments(subparsers):
    """`revival demo`."""
    from .cli import positive_float, positive_int

    demo = subparsers.add_parser(
        "demo", help="train an xLSTM and a Transformer of the same size on CPU and compare them",
        description="Train an xLSTM and a Llama-style Transformer with the same parameter count (within 5%) on the "
        "embedded Python-stdlib corpus (byte tokenizer) for the same token budget, then print a side-by-side table "
        "(parameters, train tokens/s, validation loss / perplexity / bits per byte, generation tokens/s, state or KV "
        "cache bytes), write a loss-curve PNG and print a sample from each. About 3-3.5 minutes on 2 CPU cores.")
    demo.add_argument("--models", default="xlstm,llama",
                      help="comma-separated; 'xlstm' and 'llama' are the demo sizes, any preset name (e.g. "
                      "'xlstm[7:1]', 'xlstm-large') is sized to the first model's parameter count "
                      "(default: xlstm,llama)")
    demo.add_argument("--minutes", type=positive_float, default=2.5,
                      help="training time budget for all models together; the shared token budget is set from a "
                      "short timing of each model (default: 2.5)")
    demo.add_argument("--tokens", type=positive_int, default=None,
                      help="fixed training token budget per model (overrides --minutes; reproducible across machines)")
    demo.add_argument("--out-dir", default="runs/demo", help="default: runs/demo")
    demo.add_argument("--prompt", default="def ", help="generation prompt (default: 'def ')")
    demo.add_argument("--seed", type=int, default=0, help="default: 0")
    demo.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_run_command)
    return demo


def _run_command(args) -> int:
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    run_demo(models=models, minutes=args.minutes, tokens=args.tokens, out_dir=args.out_dir, prompt=args.prompt,
             seed=args.seed, threads=args.threads, progress=not args.no_progress)
    return 0


# ------------------------------------------------------------------------------------------------ the demo
def _clear_previous(run_dir: Path) -> None:
    """Remove what an earlier demo wrote into `run_dir` (and only that)."""
    for name in ("metrics.csv", "loss.png"):
        if (run_dir / name).is_file():
            (run_dir / name).unlink()
    for name in ("checkpoints", "tensorboard"):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)


def _format_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_table(results: list[dict[str, Any]]) -> str:
    rows = [
        ("model", lambda r: r["label"]),
        ("layout", lambda r: f"{r['preset']} {r['pattern']}"),
        ("d_model x blocks", lambda r: f"{r['d_model']} x {r['num_blocks']}"),
        ("parameters", lambda r: f"{r['parameters']:,}"),
        ("train tokens", lambda r: f"{r['train_tokens']:,}"),
        ("train tokens/s", lambda r: f"{r['train_tokens_per_s']:,.0f}"),
        ("train time", lambda r: f"{r['train_seconds']:.0f} s"),
        ("val loss (nats/token)", lambda r: f"{r['val_loss']:.4f}"),
        ("val perplexity", lambda r: f"{r['val_perplexity']:.3f}"),
        ("val bits/byte", lambda r: f"{r['val_bpb']:.4f}"),
        ("generate tokens/s", lambda r: f"{r['generate_tokens_per_s']:,.0f}"),
        (f"state bytes @ {results[0]['generate_positions']} tok", lambda r: _format_bytes(r["state_bytes"])),
        ("state growth / token", lambda r: _format_bytes(r["state_growth_per_token"])),
    ]
    width = max(len(name) for name, _ in rows)
    cells = [[get(r) for r in results] for _, get in rows]
    col = [max(len(row[i]) for row in cells) for i in range(len(results))]
    lines = []
    for (name, _), row in zip(rows, cells):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(row, col)))
        if name == "model":
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def run_demo(models: list[str] | None = None, minutes: float = 2.5, tokens: int | None = None,
             out_dir: str | os.PathLike = "runs/demo", prompt: str = "def ", seed: int = 0, threads: int | None = None,
             progress: bool = True, corpus=None, print_fn=print) -> list[dict[str, Any]]:
    """Run the demo (module docstring); returns one result dict per model. `corpus` defaults to the stdlib corpus."""
    wall_start = time.perf_counter()
    models = list(models or ["xlstm", "llama"])
    if not (isinstance(minutes, (int, float)) and minutes > 0):
        raise UserError(f"minutes: expected a positive number, got {minutes!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    tokenizer = ByteTokenizer()
    chosen = demo_model_options(models, tokenizer.vocab_size)
    if corpus is None:
        print_fn("loading the embedded corpus (Python standard library sources) ...")
        corpus = load_corpus("stdlib", show_progress=progress)
    validation = [document[:EVAL_DOC_MAX_BYTES] for document in corpus.validation]
    corpus = dataclasses.replace(corpus, validation=validation)
    sequence_tokens = BATCH_SIZE * CONTEXT_LENGTH
    if tokens is None:
        torch.manual_seed(seed)
        per_token = [seconds_per_token(options, BATCH_SIZE, CONTEXT_LENGTH) for _, options in chosen]
        tokens = int(minutes * 60 / sum(per_token))
        budget_note = f"sized to fit {minutes:g} training minutes on this machine"
    else:
        budget_note = "fixed with --tokens"
    steps = max(EVALS, math.ceil(tokens / sequence_tokens / EVALS) * EVALS)  # evaluations land on the last step
    print_fn(f"corpus {corpus.name} ({corpus.content_hash[:12]}): {corpus.num_bytes('train'):,} train bytes; "
             f"validation: the first {EVAL_DOC_MAX_BYTES // 1024} KB of each document, in order, until "
             f"{EVAL_MAX_TOKENS:,} tokens are reached (the last document read to its end: the count is printed below)")
    print_fn(f"token budget per model: {steps} steps x {BATCH_SIZE} x {CONTEXT_LENGTH} = {steps * sequence_tokens:,} "
             f"tokens ({budget_note})")

    results, curves = [], {}
    for label, options in chosen:
        run_dir = out_dir / label
        _clear_previous(run_dir)
        run = RunConfig(
            model=dict(options),
            data=DataConfig(corpus="stdlib", tokenizer="byte", context_length=CONTEXT_LENGTH),
            train=TrainConfig(steps=steps, batch_size=BATCH_SIZE, lr=LEARNING_RATE, warmup_steps=max(1, steps // 10),
                              weight_decay=0.1, eval_every=steps // EVALS, eval_docs=len(validation),
                              eval_max_tokens=EVAL_MAX_TOKENS, checkpoint_every=steps, keep_checkpoints=1,
                              log_every=max(1, steps // 50), seed=seed, device="cpu", out_dir=str(run_dir),
                              tensorboard=False, progress=progress))
        run.validate()
        trainer = Trainer(run, corpus=corpus, print_fn=print_fn)
        print_fn(f"\n[{label}] {options['preset']} pattern {trainer.model_config.pattern!r}, "
                 f"{trainer.model.num_parameters():,} parameters")
        train_start = time.perf_counter()
        summary = trainer.train()
        train_seconds = time.perf_counter() - train_start
        prompt_ids = tokenizer.encode(prompt)
        generation = time_generation(trainer.model, [tokenizer.eos_id, *prompt_ids], GENERATE_TOKENS, seed)
        sample_ids = generation["ids"]
        if tokenizer.eos_id in sample_ids:
            sample_ids = sample_ids[: sample_ids.index(tokenizer.eos_id)]
        curves[label] = summary["metrics_csv"]
        results.append({
            "label": label, "preset": options["preset"], "pattern": trainer.model_config.pattern,
            "d_model": trainer.model_config.d_model, "num_blocks": trainer.model_config.num_blocks,
            "parameters": summary["parameters"], "train_tokens": summary["tokens_seen"],
            "train_tokens_per_s": summary["train_tokens_per_s"], "train_seconds": train_seconds,
            "val_loss": summary["val"]["loss"], "val_perplexity": summary["val"]["perplexity"],
            "val_bpb": summary["val"]["bpb"], "val_tokens": summary["val"]["tokens"],
            "generate_tokens_per_s": generation["tokens_per_s"], "generate_positions": generation["positions"],
            "state_bytes": generation["state_bytes"], "state_growth_per_token": generation["state_growth_per_token"],
            "sample": prompt + tokenizer.decode(sample_ids), "checkpoint": str(run_dir),
        })
    plot = plot_loss_curves(curves, out_dir / "loss.png")
    table = format_table(results)
    (out_dir / "table.txt").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps({"corpus": corpus.describe(), "results": results}, indent=2))

    print_fn("\n" + table)
    for result in results:
        print_fn(f"\n--- sample from {result['label']} ({format_count(result['parameters'])} parameters, "
                 f"prompt {prompt!r}, temperature 0.8) ---\n{result['sample']}")
    print_fn(f"\nvalidation: {results[0]['val_tokens']:,} tokens; recurrent models carry their state through each "
             f"document, attention models read it in sliding {CONTEXT_LENGTH}-token windows (their training context)")
    print_fn(f"outputs: {out_dir}/ (loss plot {plot}, table.txt, results.json, one run folder per model)")
    print_fn(f"try: revival generate {out_dir / results[0]['label']} --prompt 'def ' --stream")
    print_fn(f"demo wall time: {time.perf_counter() - wall_start:.0f} s")
    return results
