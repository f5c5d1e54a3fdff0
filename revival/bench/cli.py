"""The `revival bench` subcommand: `add_arguments(subparsers)` registers it, `run_bench_command(args)` runs it.

    revival bench decode --presets xlstm-large,llama --contexts 1k,4k,16k,64k --size 125m --out runs/bench

Outputs go to --out (default runs/bench under the current folder); the repository's committed figures in
benchmarks/results are only written when --out names that folder. `--size tiny` is a CPU smoke test: two presets, short
contexts and no anchors unless asked for (seconds on 2 cores).
"""

from __future__ import annotations

import argparse

from .models import ANCHORS, SIZES
from .studies import STUDIES

DEFAULT_PRESETS = "xlstm-large,xlstm[1:0],xlstm[7:1],llama,mamba2,gated-deltanet,mingru,hybrid"
DEFAULT_CONTEXTS = {"train": "2k,8k,32k", "prefill": "1k,2k,4k,8k,16k,32k,64k", "decode": "1k,2k,4k,8k,16k,32k,64k"}
TINY_PRESETS = "xlstm[7:1],llama"  # --size tiny: a smoke test of the harness, not a comparison
TINY_CONTEXTS = {"train": "64,256", "prefill": "64,256", "decode": "64,256"}
DEFAULT_OUT = "runs/bench"


def parse_context(text: str) -> int:
    """'2048' or '2k' (x1024) -> int; argparse error otherwise."""
    value = text.strip().lower()
    try:
        number = int(value[:-1]) * 1024 if value.endswith("k") else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a context length such as 2048 or 2k, got {text!r}") from None
    if number < 2:
        raise argparse.ArgumentTypeError(f"expected a context length >= 2, got {text!r}")
    return number


def _list(parse):
    def parse_list(text: str) -> list:
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return [parse(item.strip()) for item in items]

    return parse_list


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to an argparse subparsers object; returns the new parser."""
    from ..cli import add_command

    bench = add_command(
        subparsers, "bench", help="measure training / prefill / decode speed and memory of presets (JSON + PNG)",
        description="Benchmark presets (random weights) and, when transformers is installed, its xLSTMForCausalLM and "
        "LlamaForCausalLM at the same sizes. Writes bench_<study>.json (device, versions, config, every figure) and "
        "bench_<study>.png to --out.",
        epilog="examples:\n  revival bench prefill --size tiny --contexts 256,1k --device cpu\n"
        "  revival bench train --size 125m --contexts 2k,8k,32k\n"
        "  revival bench decode --size 125m --batch-sizes 1,16 --presets xlstm-large,llama\n"
        f"anchors: {', '.join(ANCHORS)} (added automatically next to {', '.join(ANCHORS.values())})")
    bench.add_argument("study", choices=STUDIES, help="which study to run")
    bench.add_argument("--presets", type=_list(str), default=None,
                       help=f"comma-separated preset names and/or anchors (default: {DEFAULT_PRESETS}; with --size "
                       f"tiny: {TINY_PRESETS})")
    bench.add_argument("--contexts", type=_list(parse_context), default=None,
                       help="comma-separated context lengths, '2k' = 2048 (default per study: train "
                       f"{DEFAULT_CONTEXTS['train']}; prefill/decode {DEFAULT_CONTEXTS['decode']}; with --size tiny: "
                       f"{TINY_CONTEXTS['train']})")
    bench.add_argument("--size", choices=SIZES, default="125m",
                       help="tiny (CPU smoke test), 125m (~125M parameters per preset; default) or 1.3b "
                       "(~1.3B, d_model 2048)")
    bench.add_argument("--batch-sizes", type=_list(int), default=None, help="decode only (default: 1)")
    bench.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    bench.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32")
    bench.add_argument("--out", default=DEFAULT_OUT,
                       help=f"output folder (default: {DEFAULT_OUT}); the committed figures live in benchmarks/results")
    anchors = bench.add_mutually_exclusive_group()
    anchors.add_argument("--anchors", action="store_true", help="add the transformers anchors (default except tiny)")
    anchors.add_argument("--no-anchors", action="store_true", help="skip the transformers anchors")
    bench.add_argument("--cuda-graphs", action="store_true",
                       help="replay the decode step of recurrent-only revival models and the prefill of every "
                       "revival model as CUDA graphs (checked against eager calls first)")
    bench.add_argument("--max-seconds", type=float, default=None,
                       help="time budget: points not started by then are recorded as skipped")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(handler=run_bench_command)
    return bench


def run_bench_command(args: argparse.Namespace) -> int:
    """Run the study named by parsed `args`; print one line per point; return 0."""
    from .studies import run_study

    tiny = args.size == "tiny"
    presets = args.presets or (TINY_PRESETS if tiny else DEFAULT_PRESETS).split(",")
    contexts = args.contexts or [parse_context(c) for c in (TINY_CONTEXTS if tiny else DEFAULT_CONTEXTS)[args.study]
                                 .split(",")]
    anchors = args.anchors or (not args.no_anchors and not tiny)
    result = run_study(args.study, presets=presets, contexts=contexts, device=args.device, dtype=args.dtype,
                       out_dir=args.out, size=args.size, batch_sizes=args.batch_sizes, anchors=anchors,
                       cuda_graphs=args.cuda_graphs, max_seconds=args.max_seconds,
                       progress=not args.no_progress)
    print(format_table(result))
    print(f"wrote {args.out}/bench_{args.study}.json and {args.out}/{result['plot']}")
    return 0


def format_table(result: dict) -> str:
    """A plain-text table of the points."""
    lines = [f"{'model':<16s} {'context':>8s} {'batch':>5s} {'tokens/s':>12s} {'extra':>24s} {'peak GiB':>9s}  status"]
    for p in result["points"]:
        rate = f"{p['tokens_per_s']:,.0f}" if p.get("tokens_per_s") else "-"
        extra = ""
        if p.get("mfu") is not None:
            extra = f"MFU {p['mfu']:.1%}"
        elif p.get("ttft_seconds") is not None:
            extra = f"TTFT {p['ttft_seconds'] * 1e3:.1f} ms{' graph' if p.get('cuda_graph') else ''}"
        elif p.get("step_seconds") is not None:
            extra = f"{p['step_seconds'] * 1e3:.2f} ms/step{' graph' if p.get('cuda_graph') else ''}"
        peak = f"{p['peak_memory_bytes'] / 2**30:.2f}" if p.get("peak_memory_bytes") else "-"
        status = p["status"] + (f" ({p['error']})" if p.get("error") else "")
        lines.append(f"{p['model']:<16s} {p['context']:>8d} {p['batch']:>5d} {rate:>12s} {extra:>24s} {peak:>9s}  "
                     f"{status}")
    return "\n".join(lines)
