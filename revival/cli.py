"""The `revival` command: train, eval, generate, demo, bench.

    revival train --config configs/xlstm-tiny.yaml [section.key=value ...] [--resume]
    revival eval RUN_OR_MODEL_DIR [--split validation|test] [--corpus NAME_OR_PATH]
    revival generate RUN_OR_MODEL_DIR --prompt "def " [--max-new-tokens N] [--temperature T] [--stream]
    revival demo [--models xlstm,llama] [--minutes M]
    revival bench train|prefill|decode [--presets ...] [--contexts 2k,8k] [--size tiny|125m|1.3b] [--out DIR]

Bad arguments or configs print one line `revival <command>: error: ...` and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .bench.cli import add_bench_parser, run_bench_command

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1

_EPILOG_TRAIN = """\
overrides are SECTION.KEY=VALUE with SECTION in model, data, train; values are YAML scalars, e.g.
  revival train --config configs/xlstm-tiny.yaml train.steps=200 train.lr=3e-3 model.d_model=128
outputs go to train.out_dir: metrics.csv, loss.png, tensorboard/, checkpoints/step-*/ and checkpoints/latest.
"""
_EPILOG_CHECKPOINT = """\
CHECKPOINT is a run directory (its latest checkpoint is used), a checkpoints/ folder, or a model directory
(config.json + model.safetensors + a tokenizer, e.g. a Hugging Face xLSTM directory with tokenizer.json).
"""


def _number(kind: type, description: str, accept):
    """An argparse `type=` that parses `kind` and accepts values where `accept(value)` is true."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {value}")
        return value

    return parse


_positive_int = _number(int, "a positive integer", lambda value: value >= 1)
_non_negative_int = _number(int, "an integer >= 0", lambda value: value >= 0)
_positive_float = _number(float, "a positive number", lambda value: value > 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revival", description="Train, evaluate and sample xLSTM / recurrent language models (and a Transformer "
        "baseline). Run `revival demo` first.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"revival {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train a model from a YAML run config", epilog=_EPILOG_TRAIN,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model from a YAML run config (sections model, data, train; see configs/).")
    train.add_argument("--config", required=True, metavar="FILE.yaml", help="run config (e.g. configs/xlstm-tiny.yaml)")
    train.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    train.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in train.out_dir (bit-identical on CPU)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint: loss, perplexity, bits per byte", epilog=_EPILOG_CHECKPOINT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate a checkpoint on whole documents of a corpus split (state carried across segments).")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or model directory")
    evaluate.add_argument("--split", choices=("validation", "test"), default="validation", help="default: validation")
    evaluate.add_argument("--corpus", default=None,
                          help="corpus name or path (default: the run's data.corpus, else 'stdlib')")
    evaluate.add_argument("--context-length", type=_positive_int, default=None,
                          help="segment length (default: the run's data.context_length, else 256)")
    evaluate.add_argument("--max-docs", type=_positive_int, default=None, help="evaluate at most this many documents")
    evaluate.add_argument("--max-tokens", type=_positive_int, default=None,
                          help="stop after the document that reaches this many tokens")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")

    generate = commands.add_parser(
        "generate", help="sample text from a checkpoint", epilog=_EPILOG_CHECKPOINT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample a continuation of a prompt: one prefill, then one token per step with the state carried.")
    generate.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or model directory")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=_non_negative_int, default=200, help="default: 200")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    generate.add_argument("--top-k", type=_positive_int, default=None, help="keep the k most likely tokens")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    generate.add_argument("--repetition-penalty", type=_positive_float, default=1.0, help="1.0 = none (default)")
    generate.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    generate.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    generate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")

    demo = commands.add_parser(
        "demo", help="train an xLSTM and a Transformer of the same size on CPU and compare them",
        description="Train an xLSTM and a Llama-style Transformer with the same parameter count (within 5%) on the "
        "embedded Python-stdlib corpus (byte tokenizer) for the same token budget, then print a side-by-side table "
        "(parameters, train tokens/s, validation loss / perplexity / bits per byte, generation tokens/s, state or KV "
        "cache bytes), write a loss-curve PNG and print a sample from each. About 3-3.5 minutes on 2 CPU cores.")
    demo.add_argument("--models", default="xlstm,llama",
                      help="comma-separated; 'xlstm' and 'llama' are the demo sizes, any preset name (e.g. "
                      "'xlstm[7:1]', 'xlstm-large') is sized to the first model's parameter count "
                      "(default: xlstm,llama)")
    demo.add_argument("--minutes", type=_positive_float, default=2.5,
                      help="training time budget for all models together; the shared token budget is set from a "
                      "short timing of each model (default: 2.5)")
    demo.add_argument("--tokens", type=_positive_int, default=None,
                      help="fixed training token budget per model (overrides --minutes; reproducible across machines)")
    demo.add_argument("--out-dir", default="runs/demo", help="default: runs/demo")
    demo.add_argument("--prompt", default="def ", help="generation prompt (default: 'def ')")
    demo.add_argument("--seed", type=int, default=0, help="default: 0")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_bench_parser(commands)
    return parser


# ------------------------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_run_config
    from .train.trainer import Trainer

    run = load_run_config(args.config, args.overrides)
    if args.no_progress:
        run.train.progress = False
    summary = Trainer(run, resume=args.resume).train()
    val = summary["val"] or {}
    print(f"done: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
          f"{summary['train_tokens_per_s']:,.0f} train tokens/s, skipped steps {summary['skipped_steps']}")
    if val:
        print(f"validation: loss {val['loss']:.4f}  perplexity {val['perplexity']:.2f}  bits/byte {val['bpb']:.4f}")
    print(f"outputs: {run.train.out_dir} (metrics {summary['metrics_csv']}, plot {summary['plot']}, "
          f"checkpoints {Path(run.train.out_dir) / 'checkpoints'})")
    return 0


def _load_for_inference(checkpoint: str, device_name: str):
    """(model on device, tokenizer, checkpoint dir, run config dict or {})."""
    import yaml

    from .data.tokenizers import load_tokenizer
    from .models import from_pretrained
    from .train.checkpoint import resolve_checkpoint
    from .train.trainer import resolve_device

    directory = resolve_checkpoint(checkpoint)
    device = resolve_device(device_name)
    tokenizer = load_tokenizer(directory)
    model = from_pretrained(directory, device=device)
    model.eval()
    run_file = directory / "run.yaml"
    run = yaml.safe_load(run_file.read_text()) if run_file.is_file() else {}
    return model, tokenizer, directory, run or {}


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .train.trainer import evaluate

    model, tokenizer, directory, run = _load_for_inference(args.checkpoint, args.device)
    data = run.get("data") or {}
    corpus_name = args.corpus or data.get("corpus") or "stdlib"
    context_length = args.context_length or int(data.get("context_length") or 256)
    corpus = load_corpus(corpus_name, show_progress=not args.no_progress)
    documents = corpus.split(args.split)
    if args.max_docs is not None:
        documents = documents[: args.max_docs]
    start = time.perf_counter()
    result = evaluate(model, documents, tokenizer, context_length, model.device,
                      max_tokens=args.max_tokens or 2**62, show_progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(f"checkpoint: {directory}")
    print(f"corpus: {corpus.name} ({corpus.content_hash[:12]}), split {args.split}, {result.tokens:,} tokens, "
          f"context {context_length}, {result.tokens / max(elapsed, 1e-9):,.0f} tokens/s")
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  bits/byte {result.bits_per_byte:.4f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate.sampling import stream

    model, tokenizer, _, _ = _load_for_inference(args.checkpoint, args.device)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError(f"--prompt: expected text that encodes to at least one token, got {args.prompt!r}")
    stops = None if args.no_stop else [tokenizer.eos_id]
    tokens = stream(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_tokens=stops, seed=args.seed)
    new_ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    if args.stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    for token in tokens:
        new_ids.append(token)
        if args.stream:
            text = tokenizer.decode(_without(new_ids, stops))
            if not text.endswith("\ufffd") and text.startswith(shown):  # hold back a partly decoded character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(_without(new_ids, stops))
    if args.stream:
        sys.stdout.write(text[len(shown):] if text.startswith(shown) else "")
        sys.stdout.write("\n")
    else:
        print(args.prompt + text)
    rate = len(new_ids) / max(elapsed, 1e-9)
    print(f"[{len(new_ids)} tokens in {elapsed:.2f} s, {rate:,.1f} tokens/s incl. prefill]", file=sys.stderr)
    return 0


def _without(ids: list[int], stops: list[int] | None) -> list[int]:
    return [i for i in ids if i not in stops] if stops else ids


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    models = [name.strip() for name in args.models.split(",") if name.strip()]
    run_demo(models=models, minutes=args.minutes, tokens=args.tokens, out_dir=args.out_dir, prompt=args.prompt,
             seed=args.seed, threads=args.threads, progress=not args.no_progress)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo,
            "bench": run_bench_command}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .train.trainer import TrainingStopped

    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"revival {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as error:
        print(f"revival {args.command}: {error}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"revival {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
