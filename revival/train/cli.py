"""`revival train`: train a model from a YAML run config (see revival.train and docs/cli.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError
from . import distributed

EPILOG = """\
overrides are SECTION.KEY=VALUE with SECTION in model, data, train; values are YAML scalars, e.g.
  revival train --config configs/xlstm-tiny.yaml train.steps=200 train.lr=3e-3 model.d_model=128
fine-tune a saved model: model.init_from=DIR (a run or model directory; its config and tokenizer are used).
outputs go to train.out_dir: metrics.csv, loss.png, tensorboard/, checkpoints/step-*/ and checkpoints/latest.
an out_dir that holds an earlier run needs --resume (continue it) or --overwrite (replace it).
"""


def add_arguments(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_command, positive_int

    train = add_command(
        subparsers, "train", help="train a model from a YAML run config", epilog=EPILOG,
        description="Train a model from a YAML run config (sections model, data, train; see configs/).")
    train.add_argument("--config", metavar="FILE.yaml", help="run config (required; e.g. configs/xlstm-tiny.yaml)")
    train.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in train.out_dir (bit-identical on CPU)")
    resume.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run's outputs in train.out_dir (metrics, plot, checkpoints)")
    train.add_argument("--force", action="store_true",
                       help="train even where the estimated memory or time does not fit this machine")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (a log line every log_every)")
    train.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                       help="train in N processes on this node, launched with torchrun (needs train.parallel=ddp or "
                       "fsdp; docs/distributed.md)")
    train.set_defaults(handler=run)
    return train


def run(args: argparse.Namespace) -> int:
    from .config import load_run_config
    from .trainer import Trainer

    if args.config is None:
        yaml_like = [text for text in args.overrides if "=" not in text and text.endswith((".yaml", ".yml"))]
        hint = f"; write `revival train --config {yaml_like[0]}`" if yaml_like else ""
        raise UserError(f"--config: expected a run config FILE.yaml (e.g. configs/xlstm-tiny.yaml){hint}")
    run_config = load_run_config(args.config, args.overrides)
    if args.no_progress:
        run_config.train.progress = False
    if args.nproc is not None:
        return _launch(args, run_config.train.parallel)
    trainer = Trainer(run_config, resume=args.resume, overwrite=args.overwrite, force=args.force)
    summary = trainer.train()
    distributed.shutdown(trainer.world)
    if not trainer.world.is_main:
        return 0
    print(f"done: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
          f"{summary['train_tokens_per_s']:,.0f} train tokens/s, skipped steps {summary['skipped_steps']}")
    val = summary["val"]
    if val:
        print(f"validation: loss {val['loss']:.4f}  perplexity {val['perplexity']:.2f}  bits/byte {val['bpb']:.4f} "
              f"({trainer.eval_scope(trainer.last_eval)})")
    out_dir = Path(run_config.train.out_dir)
    print(f"outputs: {out_dir} (metrics {summary['metrics_csv']}, plot {summary['plot']}, "
          f"checkpoints {out_dir / 'checkpoints'})")
    return 0


def _launch(args: argparse.Namespace, parallel: str) -> int:
    """`revival train --nproc N ...`: the same command without --nproc in N processes under torchrun."""
    if parallel == "none":
        raise UserError(f"--nproc: {args.nproc} processes need train.parallel=ddp or train.parallel=fsdp, got "
                        f"{parallel!r}")
    flags = [f"--{name.replace('_', '-')}" for name in ("resume", "overwrite", "force", "no_progress", "debug")
             if getattr(args, name, False)]
    return distributed.launch(args.nproc, ["train", "--config", args.config, *args.overrides, *flags])
