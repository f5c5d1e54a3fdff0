"""The `revival` command: train, eval, generate, demo, bench (`revival COMMAND --help` for each; docs/cli.md).

    revival train --config configs/xlstm-tiny.yaml [section.key=value ...] [--resume | --overwrite] [--force]
    revival eval RUN_OR_MODEL_DIR [--split validation|test] [--corpus NAME_OR_PATH] [--extrapolate 1x,2x,4x]
    revival eval task mqar|parity|... [--models xlstm[1:1],llama] [--size tiny|paper]
    revival generate RUN_OR_MODEL_DIR --prompt "def " [--max-new-tokens N] [--temperature T] [--stream]
    revival demo [--models xlstm,llama] [--minutes M]
    revival bench train|prefill|decode [--presets ...] [--contexts 2k,8k] [--size tiny|125m|1.3b] [--out DIR]
    revival serve RUN_OR_MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--num-slots 16]

Each command lives in its own module as `add_arguments(subparsers)`, which adds the command's parser and sets its
handler (`parser.set_defaults(handler=run)`, `run(args) -> exit status`); `SUBCOMMANDS` lists those modules.

Bad input (a `revival.errors.UserError`) prints one line `revival <command>: error: ...` and exits with status 2;
`--debug` (or the environment variable REVIVAL_DEBUG=1) shows its traceback too. Any other exception is a bug in
revival and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from .errors import UserError

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1
EXIT_INTERRUPTED = 130

# modules with `add_arguments(subparsers)`, in the order `revival --help` lists them
SUBCOMMANDS = (
    "revival.train.cli",
    "revival.train.eval_cli",
    "revival.eval.cli",
    "revival.generate.cli",
    "revival.demo",
    "revival.bench.cli",
    "revival.serve.cli",
)


# ------------------------------------------------------------------------------------------------- argument types
def number(kind: type, description: str, accept):
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


positive_int = number(int, "a positive integer", lambda value: value >= 1)
non_negative_int = number(int, "an integer >= 0", lambda value: value >= 0)
positive_float = number(float, "a positive number", lambda value: value > 0)


def add_command(subparsers, name: str, *, help: str, description: str, epilog: str | None = None):
    """A subcommand whose description and epilog keep the line breaks they are written with (its examples)."""
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


# ------------------------------------------------------------------------------------------------- parser, main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="revival", description="Train, evaluate and sample xLSTM / recurrent language models (and a Transformer "
        "baseline). Run `revival demo` first. Every command and what it costs: docs/cli.md.")
    parser.add_argument("--version", action="version", version=f"revival {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors in the input too")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_arguments(commands)
    for command in commands.choices.values():  # `revival train --debug ...` as well as `revival --debug train ...`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of errors in the input too (or set REVIVAL_DEBUG=1)")
    return parser


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("REVIVAL_DEBUG", "") not in ("", "0")


def _join_two_word_command(argv: list[str], names) -> list[str]:
    """`revival eval task ...` -> the command named "eval task" (argparse takes one word per command name)."""
    first = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if first is not None and first + 1 < len(argv) and f"{argv[first]} {argv[first + 1]}" in names:
        return [*argv[:first], f"{argv[first]} {argv[first + 1]}", *argv[first + 2 :]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    args = parser.parse_args(_join_two_word_command(list(sys.argv[1:] if argv is None else argv), commands.choices))
    from .train.trainer import TrainingStopped

    try:
        return args.handler(args)
    except UserError as error:
        if _debug_requested(args):
            traceback.print_exc()
        print(f"revival {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingStopped as error:
        print(f"revival {args.command}: {error}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"revival {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
