"""`revival eval`: loss, perplexity and bits per byte of a checkpoint on whole documents of a corpus split."""

from __future__ import annotations

import argparse
import math
import time

from ..errors import UserError

EPILOG_CHECKPOINT = """\
CHECKPOINT is a run directory (its latest checkpoint is used), a checkpoints/ folder, or a model directory
(config.json + model.safetensors + a tokenizer, e.g. a Hugging Face xLSTM directory with tokenizer.json).
"""


def add_arguments(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_command, positive_int

    evaluate = add_command(
        subparsers, "eval", help="evaluate a checkpoint: loss, perplexity, bits per byte", epilog=EPILOG_CHECKPOINT,
        description="Evaluate a checkpoint on whole documents of a corpus split (state carried across segments). "
        "The validation numbers the training log prints read only the first train.eval_docs documents (up to "
        "train.eval_max_tokens tokens), so they differ from this command's, which reads the whole split.")
    evaluate.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or model directory")
    evaluate.add_argument("--split", choices=("validation", "test"), default="validation", help="default: validation")
    evaluate.add_argument("--corpus", default=None,
                          help="corpus name or path (default: the run's data.corpus, else 'stdlib')")
    evaluate.add_argument("--context-length", type=positive_int, default=None,
                          help="segment length (default: the run's data.context_length, else 256)")
    evaluate.add_argument("--max-docs", type=positive_int, default=None, help="evaluate at most this many documents")
    evaluate.add_argument("--max-tokens", type=positive_int, default=None,
                          help="stop after the document that reaches this many tokens")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.add_argument("--extrapolate", default=None, metavar="1x,2x,4x,...",
                          help="instead: loss by position and by context length up to these multiples of the context "
                          "(revival.eval.extrapolate; JSON + PNG under --out)")
    evaluate.add_argument("--sequences", type=positive_int, default=8,
                          help="--extrapolate: rows of the split to read (default: 8)")
    evaluate.add_argument("--out", default="runs/extrapolate", help="--extrapolate: output folder")
    evaluate.set_defaults(handler=run)
    return evaluate


def run(args: argparse.Namespace) -> int:
    from ..data import load_corpus
    from .checkpoint import load_for_inference
    from .trainer import evaluate

    if args.extrapolate is not None:
        from ..eval.extrapolate import run_extrapolation

        return run_extrapolation(args)
    model, tokenizer, directory, run_config = load_for_inference(args.checkpoint, args.device)
    data = run_config.get("data") or {}
    corpus_name = args.corpus or data.get("corpus") or "stdlib"
    context_length = args.context_length or int(data.get("context_length") or 256)
    corpus = load_corpus(corpus_name, show_progress=not args.no_progress,
                         **{key: data[key] for key in ("validation_fraction", "test_fraction", "text_field")
                            if data.get(key) is not None and not args.corpus})
    documents = corpus.split(args.split)
    if args.max_docs is not None:
        documents = documents[: args.max_docs]
    start = time.perf_counter()
    result = evaluate(model, documents, tokenizer, context_length, model.device,
                      max_tokens=args.max_tokens or 2**62, show_progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    if not math.isfinite(result.loss):
        raise UserError(f"checkpoint {str(directory)!r}: the loss is {result.loss} on {corpus.name}; the weights "
                        "hold non-finite values or the training diverged")
    read = f"{result.documents} of {len(corpus.split(args.split))} documents, whole"
    print(f"checkpoint: {directory}")
    print(f"corpus: {corpus.name} ({corpus.content_hash[:12]}), split {args.split} ({read}), {result.tokens:,} "
          f"tokens, context {context_length}, {result.tokens / max(elapsed, 1e-9):,.0f} tokens/s")
    print(f"loss {result.loss:.4f}  perplexity {result.perplexity:.3f}  bits/byte {result.bits_per_byte:.4f}")
    return 0
