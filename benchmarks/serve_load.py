"""Load test of the `revival serve` engine: N concurrent streams, throughput and latency vs context length.

For each preset (default xlstm-large and llama at 125M, random weights, bfloat16), each context length and each
stream count N, N requests with distinct random prompts of `context` tokens are submitted at once to one engine with
N slots (CUDA-graph decode on GPU, no prefix snapshots, no stop token: every request generates `--gen` tokens).
Recorded per point:

    tokens_per_s          generated tokens / wall time from the first submission to the last token (incl. prefill)
    decode_tokens_per_s   tokens generated after the last request joined the batch / the time they took
    ttft_p50/p99_s        submission -> first token (the prefills run one request at a time, so this grows with N)
    itl_p50/p99_s         inter-token latency of a stream (gap between its consecutive tokens)
    latency_p50/p99_s     submission -> last token of a request
    state_bytes_per_session  a slot's state (recurrent state; attention: a KV cache of context + gen positions)
    peak_memory_bytes     torch.cuda.max_memory_allocated during the point (CUDA only)

This measures the engine (scheduling, batching, sampling, event delivery), not HTTP: clients are in-process callbacks.
Writes serve_load.json and serve_load.png to --out (default $OUT, else runs/serve_load).

    python benchmarks/serve_load.py                                    # H200: about 3-4 minutes
    python benchmarks/serve_load.py --sizes 125m,1.3b --streams 1,16,64 --contexts 1k,8k
    python benchmarks/serve_load.py --device cpu --sizes tiny --streams 1,4 --contexts 64 --gen 8   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from revival.bench.cli import parse_context  # noqa: E402
from revival.bench.models import bench_config  # noqa: E402
from revival.models import LanguageModel  # noqa: E402
from revival.serve.engine import Engine, EngineConfig, SamplingParams, Token  # noqa: E402

DEFAULT_OUT = os.environ.get("OUT") or "runs/serve_load"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_point(engine: Engine, streams: int, context: int, gen: int, seed: int) -> dict:
    """Submit `streams` requests at once; wait for all; return the timings."""
    generator = torch.Generator().manual_seed(seed)
    vocab = engine.vocab_size
    prompts = [torch.randint(0, vocab, (context,), generator=generator).tolist() for _ in range(streams)]
    times: list[list[float]] = [[] for _ in range(streams)]
    submitted = [0.0] * streams
    done = threading.Event()
    remaining = [streams]
    lock = threading.Lock()

    def listener(i):
        def on_event(event):
            if isinstance(event, Token):
                times[i].append(time.perf_counter())
                return
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
        return on_event

    params = SamplingParams(max_tokens=gen, temperature=1.0)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        submitted[i] = time.perf_counter()
        engine.submit(prompt, params, listener(i))
    if not done.wait(timeout=600):
        raise RuntimeError(f"streams={streams} context={context}: not finished after 600 s")
    end = max(t[-1] for t in times)
    generated = sum(len(t) for t in times)
    last_join = max(t[0] for t in times)
    after_join = sum(1 for t in times for x in t if x > last_join)
    ttft = [t[0] - s for t, s in zip(times, submitted)]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    latency = [t[-1] - s for t, s in zip(times, submitted)]
    return {
        "streams": streams, "context": context, "gen_tokens": gen, "generated": generated,
        "wall_s": end - start, "tokens_per_s": generated / (end - start),
        "decode_tokens_per_s": after_join / (end - last_join) if end > last_join else None,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
        "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
        "state_bytes_per_session": engine.pool.nbytes() // engine.config.num_slots,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if engine.device.type == "cuda" else None,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    series: dict[tuple, list[dict]] = {}
    for point in results:
        series.setdefault((point["preset"], point["size"], point["context"]), []).append(point)
    for (preset, size, context), points in sorted(series.items()):
        points.sort(key=lambda p: p["streams"])
        label = f"{preset} {size} ctx {context}"
        streams = [p["streams"] for p in points]
        axes[0].plot(streams, [p["decode_tokens_per_s"] or 0 for p in points], marker="o", label=label)
        axes[1].plot(streams, [p["itl_p99_s"] * 1e3 if p["itl_p99_s"] else 0 for p in points], marker="o",
                     label=label)
    sessions: dict[tuple, dict[int, int]] = {}
    for point in results:
        sessions.setdefault((point["preset"], point["size"]), {})[point["context"]] = point["state_bytes_per_session"]
    for (preset, size), by_context in sorted(sessions.items()):
        contexts = sorted(by_context)
        axes[2].plot(contexts, [by_context[c] / 2**20 for c in contexts], marker="o", label=f"{preset} {size}")
    axes[0].set_xscale("log", base=2)
    axes[1].set_xscale("log", base=2)
    axes[0].set(xlabel="concurrent streams", ylabel="decode tokens/s (all streams)",
                title="throughput")
    axes[1].set(yscale="log", xlabel="concurrent streams", ylabel="p99 inter-token latency (ms)",
                title="latency")
    axes[2].set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="MiB per session",
                title="state memory per session")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="xlstm-large,llama")
    parser.add_argument("--sizes", default="125m", help="comma-separated: tiny, 125m, 1.3b (default: 125m)")
    parser.add_argument("--streams", default="1,4,16,64,256", help="concurrent streams (default: 1,4,16,64,256)")
    parser.add_argument("--contexts", default="512,4k,16k", help="prompt lengths (default: 512,4k,16k)")
    parser.add_argument("--max-session-tokens", type=int, default=2 * 2**20,
                        help="skip points whose streams x context exceeds this (default: 2M tokens, bounding the "
                        "prefill time)")
    parser.add_argument("--gen", type=int, default=128, help="tokens generated per request (default: 128)")
    parser.add_argument("--prefill-chunk", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    streams_list = [int(s) for s in args.streams.split(",")]
    contexts = [parse_context(c) for c in args.contexts.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, started = [], time.perf_counter()
    for size in args.sizes.split(","):
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = LanguageModel(bench_config(preset, size)).to(device=device, dtype=dtype).eval()
            parameters = model.num_parameters()
            for context in contexts:
                streams_here = [n for n in streams_list if n * context <= args.max_session_tokens]
                if not streams_here:
                    continue
                config = EngineConfig(num_slots=max(streams_here), max_prompt_tokens=context, max_tokens=args.gen,
                                      max_queue=max(streams_here), prefill_chunk=args.prefill_chunk,
                                      snapshot_bytes=0, cuda_graphs=not args.no_cuda_graphs)
                engine = Engine(model, config).start()
                try:
                    run_point(engine, 1, min(context, 16), 2, seed=1)  # warm-up (kernels, allocator)
                    for streams in streams_here:
                        point = run_point(engine, streams, context, args.gen, seed=streams)
                        point.update(preset=preset, size=size, parameters=parameters,
                                     cuda_graphs=engine.uses_cuda_graphs, graph_error=engine.graph_error)
                        results.append(point)
                        itl = point["itl_p99_s"]
                        print(f"{preset:12s} {size:5s} ctx {context:6d} streams {streams:4d}: "
                              f"{point['decode_tokens_per_s'] or 0:10.0f} decode tok/s, "
                              f"{point['tokens_per_s']:10.0f} tok/s incl. prefill, ttft p50 "
                              f"{point['ttft_p50_s']:.3f} s, itl p99 {(itl or 0) * 1e3:.2f} ms, "
                              f"{point['state_bytes_per_session'] / 2**20:.2f} MiB/session "
                              f"[{time.perf_counter() - started:.0f} s]", flush=True)
                finally:
                    engine.stop()
                    del engine
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            del model
    record = {
        "benchmark": "serve_load", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or "cpu", "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "gen_tokens": args.gen, "prefill_chunk": args.prefill_chunk, "total_s": time.perf_counter() - started,
        "points": results,
    }
    (out / "serve_load.json").write_text(json.dumps(record, indent=1))
    plot(results, out / "serve_load.png")
    print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.png'} ({record['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
