"""CPU length extrapolation (issue 22): small models trained at context 128, scored at 1x-8x on the same tokens.

    OMP_NUM_THREADS=1 python benchmarks/cpu_extrapolate.py --out benchmarks/results   (~10 minutes, 1 thread)
    python benchmarks/cpu_extrapolate.py --out /tmp/x --smoke                            (seconds: checks the script)

Every model is trained by `revival.train.Trainer` (the path of `revival train`: AdamW, warmup + cosine, packed rows
of [eos] + document) on tiny Shakespeare (--corpus, default .scratch/tinyshakespeare.txt; the stdlib corpus of
`revival demo` when that file is absent; the JSON names the one read), byte tokenizer, split by lines: 10% before
the last 1% (test) is the validation split, its first 16,000 bytes the trainer's validation loss. Every model sees
the same steps x batch x context tokens; xlstm-large at d_model 64 x 4 blocks sets the parameter count, every
other model is sized to it within 5% (`cpu_quality_newton.model_options`).

Then `revival.eval.extrapolate` on 32 rows of 8 x 128 + 1 tokens from evenly spaced offsets over the whole
validation split: carried (the whole prefix, state carried) against window (a fresh state reading 64-127 tokens:
the model at its training context) on the same targets. The issue's target, read without the text's confound:
beyond_ratio_to_window at 4x (carried / window mean loss over targets 128..511) <= 1.05. Writes
cpu_extrapolate.json (device, versions, commit, corpus, settings, per model every ratio and the per-position
curves) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cpu_quality_newton import model_options  # noqa: E402  (the parameter matching of the CPU quality run)

from revival.bench.report import environment  # noqa: E402
from revival.data import load_corpus  # noqa: E402
from revival.data.tokenizers import ByteTokenizer  # noqa: E402
from revival.eval.extrapolate import corpus_sequences, extrapolate  # noqa: E402
from revival.train.config import DataConfig, RunConfig, TrainConfig  # noqa: E402
from revival.train.trainer import Trainer  # noqa: E402

MODELS = ["xlstm-large", "xlstm[1:1]", "mingru", "mamba2", "gated-deltanet", "llama"]
DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".scratch", "tinyshakespeare.txt")
MULTIPLIERS = [1, 2, 4, 8]
TARGET = 1.05  # issue 22: the loss at 4x the training context <= 1.05x the loss at it
FULL = dict(reference="xlstm-large", d_model=64, num_blocks=4, num_heads=4, context=128, batch=8, steps=400,
            lr=3e-3, eval_tokens=16_000, rows=32)
SMOKE = dict(reference="xlstm-large", d_model=32, num_blocks=2, num_heads=2, context=16, batch=2, steps=3,
             lr=3e-3, eval_tokens=200, rows=4)


def first_break(result: dict, limit: float = TARGET) -> list | None:
    """[start, end] of the first position bin where carried / window loss exceeds `limit`, None when none does."""
    carried, window = (result["modes"][mode]["loss_by_position"] for mode in ("carried", "window"))
    for bounds, c, w in zip(result["modes"]["carried"]["position_bins"], carried, window):
        if c / w > limit:
            return bounds
    return None


def run_model(preset: str, model: dict, corpus_path: str, corpus, settings: dict, out_dir: Path, seed: int) -> dict:
    steps, context = settings["steps"], settings["context"]
    run = RunConfig(
        model=dict(model),
        data=DataConfig(corpus=corpus_path, tokenizer="byte", context_length=context,
                        validation_fraction=None if corpus_path == "stdlib" else 0.1),
        train=TrainConfig(steps=steps, batch_size=settings["batch"], lr=settings["lr"],
                          warmup_steps=max(1, steps // 10), eval_every=steps, eval_docs=len(corpus.validation),
                          eval_max_tokens=settings["eval_tokens"], checkpoint_every=steps, keep_checkpoints=1,
                          log_every=max(1, steps // 4), seed=seed, device="cpu", out_dir=str(out_dir / preset),
                          tensorboard=False, progress=False))
    run.validate()
    # the trainer's validation loss on the split's first eval_tokens bytes (one document: it would read it all)
    head = dataclasses.replace(corpus, validation=[doc[: settings["eval_tokens"]] for doc in corpus.validation])
    trainer = Trainer(run, corpus=head, print_fn=lambda *a, **k: print(f"  [{preset}]", *a, flush=True, **k))
    config = trainer.model_config
    print(f"[{preset}] pattern {config.pattern!r}, d_model {config.d_model}, {trainer.model.num_parameters():,} "
          "parameters", flush=True)
    began = time.perf_counter()
    summary = trainer.train()
    trained = time.perf_counter()
    sequences = corpus_sequences(corpus.validation, trainer.tokenizer, max(MULTIPLIERS) * context + 1,
                                 settings["rows"])
    result = extrapolate(trainer.model, sequences, context, MULTIPLIERS)
    row = {"model": preset, "pattern": config.pattern, "d_model": config.d_model, "num_blocks": config.num_blocks,
           "parameters": summary["parameters"], "tokens": summary["tokens_seen"],
           "train_seconds": trained - began, "extrapolate_seconds": time.perf_counter() - trained,
           "val_loss": summary["val"]["loss"], "val_tokens": summary["val"]["tokens"],
           "first_bin_over_target": first_break(result), "extrapolation": result}
    beyond = result["beyond_ratio_to_window"]
    print(f"[{preset}] val loss {row['val_loss']:.4f}; carried / window beyond the context: "
          + "  ".join(f"{k} {v:.3f}" for k, v in beyond.items())
          + f"; {row['train_seconds']:.0f} s training, {row['extrapolate_seconds']:.0f} s extrapolating", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | params | val loss | carried / window beyond ctx: 2x / 4x / 8x | carried / window 0..8x | "
             "4x / 1x carried (old) | 4x / 1x window | first bin over 1.05 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["extrapolation"]
        beyond = " / ".join(f"{e['beyond_ratio_to_window'][f'{m}x']:.3f}" for m in MULTIPLIERS if m >= 2)
        broken = "-" if r["first_bin_over_target"] is None else "{}-{}".format(*r["first_bin_over_target"])
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['val_loss']:.4f} | {beyond} | "
                     f"{e['ratio_to_window']['8x']:.3f} | {e['modes']['carried']['ratio_to_1x']['4x']:.3f} | "
                     f"{e['modes']['window']['ratio_to_1x']['4x']:.3f} | {broken} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for cpu_extrapolate.json")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS,
                        help="a text file (default: .scratch/tinyshakespeare.txt; stdlib when it is absent)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default: {','.join(MODELS)})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 3 steps: checks the script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(SMOKE if args.smoke else FULL)
    settings["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    corpus_path = os.path.abspath(args.corpus) if os.path.exists(args.corpus) else "stdlib"
    # a tenth of the lines: enough validation text for 32 rows of 1,025 bytes from spaced offsets
    corpus = (load_corpus(corpus_path, validation_fraction=0.1, show_progress=False) if corpus_path != "stdlib"
              else load_corpus("stdlib", show_progress=False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    header = {"benchmark": "cpu_extrapolate", "smoke": args.smoke, **environment(torch.device("cpu")),
              "corpus": corpus.describe(), "settings": settings, "multipliers": MULTIPLIERS, "target": TARGET,
              "tokens_per_model": settings["steps"] * settings["batch"] * settings["context"]}
    print(json.dumps({k: header[k] for k in ("corpus", "settings", "tokens_per_model")}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu_extrapolate_") as runs:
        for preset, model in model_options(settings, ByteTokenizer().vocab_size):
            rows.append(run_model(preset, model, corpus_path, corpus, settings, Path(runs), args.seed))
    header["wall_seconds"] = time.perf_counter() - began
    path = out / "cpu_extrapolate.json"
    path.write_text(json.dumps({**header, "results": rows, "table": table(rows)}, indent=1) + "\n")
    print("\n" + table(rows))
    print(f"wrote {path} ({header['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
