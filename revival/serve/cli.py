"""`revival serve`: an OpenAI-compatible HTTP server for a checkpoint (continuous batching, prefix state snapshots).

    revival serve RUN_OR_MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--num-slots 16] ...

Needs the `serve` extra (`pip install 'revival[serve]'`: FastAPI + uvicorn). docs/serve.md has the endpoints.
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_arguments(subparsers) -> argparse.ArgumentParser:
    from ..cli import positive_float, positive_int
    from .engine import EngineConfig

    defaults = EngineConfig()
    serve = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint: /v1/completions, /v1/chat/completions (streaming or not), /v1/models, "
        "/v1/states, /health, /metrics. Requests are decoded together in a fixed pool of state slots; a prompt "
        "that extends an earlier one (a conversation's next turn) prefills only its new tokens. See docs/serve.md.")
    serve.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or model directory (with a tokenizer)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: $REVIVAL_API_KEY, else no key)")
    serve.add_argument("--model-name", default=None, help="the model id clients send (default: the directory name)")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    serve.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="weights dtype (default: bfloat16 on CUDA, the checkpoint's on CPU)")
    serve.add_argument("--num-slots", type=positive_int, default=defaults.num_slots,
                       help=f"requests decoded together (default: {defaults.num_slots})")
    serve.add_argument("--max-prompt-tokens", type=positive_int, default=defaults.max_prompt_tokens,
                       help=f"longest prompt accepted (default: {defaults.max_prompt_tokens})")
    serve.add_argument("--max-tokens", type=positive_int, default=defaults.max_tokens,
                       help=f"most tokens generated per request (default: {defaults.max_tokens})")
    serve.add_argument("--max-queue", type=positive_int, default=defaults.max_queue,
                       help=f"requests waiting for a slot before 429 (default: {defaults.max_queue})")
    serve.add_argument("--prefill-chunk", type=positive_int, default=defaults.prefill_chunk,
                       help=f"prompt tokens prefilled between two decode steps (default: {defaults.prefill_chunk})")
    serve.add_argument("--snapshot-memory", type=float, default=defaults.snapshot_bytes / 2**20, metavar="MIB",
                       help="MiB of prefix state snapshots kept (0 = off; default: %(default)g)")
    serve.add_argument("--request-timeout", type=positive_float, default=defaults.request_timeout,
                       help=f"seconds a request may take (default: {defaults.request_timeout:g})")
    serve.add_argument("--states-dir", default=None,
                       help="folder for named states (/v1/states); default: CHECKPOINT/states")
    serve.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    serve.set_defaults(handler=run)
    return serve


def build_server(args: argparse.Namespace):
    """(engine started, FastAPI app) from parsed arguments."""
    try:
        from .app import create_app
    except ImportError as error:
        raise UserError(f"revival serve needs the serve extra: pip install 'revival[serve]' ({error})") from None
    import torch

    from ..train.checkpoint import load_for_inference
    from .engine import Engine, EngineConfig

    if args.snapshot_memory < 0:
        raise UserError(f"--snapshot-memory: expected MiB >= 0, got {args.snapshot_memory}")
    model, tokenizer, directory, _ = load_for_inference(args.checkpoint, args.device)
    dtype = args.dtype or ("bfloat16" if model.device.type == "cuda" else None)
    if dtype is not None:
        model = model.to(getattr(torch, DTYPES[dtype]))
    config = EngineConfig(num_slots=args.num_slots, max_prompt_tokens=args.max_prompt_tokens,
                          max_tokens=args.max_tokens, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                          snapshot_bytes=int(args.snapshot_memory * 2**20), request_timeout=args.request_timeout,
                          cuda_graphs=not args.no_cuda_graphs)
    engine = Engine(model, config).start()
    api_key = args.api_key if args.api_key is not None else os.environ.get("REVIVAL_API_KEY") or None
    states_dir = args.states_dir if args.states_dir is not None else directory / "states"
    app = create_app(engine, tokenizer, model_name=args.model_name or directory.name, api_key=api_key,
                     states_dir=states_dir)
    return engine, app


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: expected 0-65535, got {args.port}")
    engine, app = build_server(args)
    import uvicorn

    graphs = "on" if engine.uses_cuda_graphs else f"off ({engine.graph_error})" if engine.graph_error else "off"
    print(f"revival serve: {engine.config.num_slots} slots on {engine.device}, CUDA graphs {graphs}, "
          f"state pool {engine.pool.nbytes() / 2**20:.1f} MiB; http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()
    return 0
