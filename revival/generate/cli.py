"""`revival generate`: sample a continuation of a prompt from a checkpoint (one prefill, then one token a step)."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import UserError


def add_arguments(subparsers) -> argparse.ArgumentParser:
    from ..cli import add_command, non_negative_int, positive_float, positive_int
    from ..train.eval_cli import EPILOG_CHECKPOINT

    generate = add_command(
        subparsers, "generate", help="sample text from a checkpoint", epilog=EPILOG_CHECKPOINT,
        description="Sample a continuation of a prompt: one prefill, then one token per step with the state carried.")
    generate.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or model directory")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=non_negative_int, default=200, help="default: 200")
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    generate.add_argument("--top-k", type=positive_int, default=None, help="keep the k most likely tokens")
    generate.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    generate.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="1.0 = none (default)")
    generate.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    generate.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    generate.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    generate.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    generate.set_defaults(handler=run)
    return generate


def run(args: argparse.Namespace) -> int:
    from ..train.checkpoint import load_for_inference
    from .sampling import stream

    model, tokenizer, _, _ = load_for_inference(args.checkpoint, args.device)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise UserError(f"--prompt: expected text that encodes to at least one token, got {args.prompt!r}")
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
