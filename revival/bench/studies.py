"""The studies: `run_study(name, presets, contexts, ...)` measures every (model, context, batch) point, writes
`bench_<name>.json` and `bench_<name>.png` into `out_dir`, and returns the JSON dict (schema in `revival.bench`).

    train    one optimizer step (forward + backward + AdamW) on batch x context tokens; mixed precision (float32
             weights, autocast to `dtype`) on CUDA; tokens/s, MFU (see models.py for the FLOP model), peak memory.
    prefill  batch 1, no grad, weights in `dtype`: one forward over `context` tokens up to the last position's logits;
             time-to-first-token = that time, tokens/s = context / TTFT, peak memory.
    decode   prefill `context` tokens, then `decode_tokens` single-token steps; tokens/s = batch * steps / time;
             peak allocated memory during the steps (weights + state + step buffers), the state's bytes. With
             cuda_graphs=True (opt-in, experimental) the step of a recurrent-only revival model on CUDA is captured
             once as a CUDA graph (state copied in place inside the graph); attention's KV cache grows each step, so
             attention models (and the anchors) always run eagerly. A replayed step allocates nothing: its few
             temporary buffers sit in the graph's pool and are not in that point's peak memory.
    With cuda_graphs=True the prefill of every revival model on CUDA (recurrent or attention: the shapes are fixed
    per point) is also captured once per point and replayed; the anchors always run eagerly.

Every point is timed after warm-up runs (CUDA synchronized), as the median of `repeats`. An out-of-memory point is
recorded with status "oom" and the study goes on; any other failure is recorded with status "error". A CUDA error
that poisons the context (illegal memory access) marks every later point "skipped"; the JSON is still written.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..devices import resolve_device
from ..errors import UserError
from .models import ANCHORS, build_runner, model_record, peak_flops, tokens_batch, training_flops_per_token
from .report import environment, plot_study, write_json

STUDIES = ("train", "prefill", "decode")
DEFAULTS = {  # size -> study settings
    "tiny": dict(tokens_per_step=256, warmup=1, repeats=2, decode_tokens=4),
    "125m": dict(tokens_per_step=32768, warmup=2, repeats=3, decode_tokens=32),
    "1.3b": dict(tokens_per_step=32768, warmup=2, repeats=3, decode_tokens=32),
}


def run_study(name: str, presets: list[str], contexts: list[int], device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", out_dir: str | Path = "runs/bench", *, size: str = "tiny",
              batch_sizes: list[int] | None = None, anchors: bool = True, cuda_graphs: bool = False,
              max_seconds: float | None = None, progress: bool = True, **settings: Any) -> dict[str, Any]:
    """Run study `name` over presets x contexts (x batch sizes); write JSON + PNG to `out_dir`; return the JSON dict.

    presets: revival preset names (e.g. "xlstm-large", "xlstm[7:1]") and/or anchors "hf-xlstm", "hf-llama".
    anchors: also add "hf-xlstm" / "hf-llama" when "xlstm-large" / "llama" are in presets and transformers is
    installed. batch_sizes: decode only (default [1]); train picks batch = max(1, tokens_per_step // context).
    cuda_graphs: capture the decode step of recurrent-only revival models, and the prefill of every revival model,
    as CUDA graphs; each graph is checked against eager calls before it is timed, else the point runs eagerly and
    says why (`cuda_graph_error`).
    max_seconds: points not started within this budget are recorded with status "skipped".
    settings: tokens_per_step, warmup, repeats, decode_tokens (defaults per size in DEFAULTS).
    """
    if name not in STUDIES:
        raise UserError(f"name: expected one of {list(STUDIES)}, got {name!r}")
    if not presets or not all(isinstance(p, str) and p for p in presets):
        raise UserError(f"presets: expected a non-empty list of preset names, got {presets!r}")
    if not contexts or not all(isinstance(c, int) and c >= 2 for c in contexts):
        raise UserError(f"contexts: expected a non-empty list of integers >= 2, got {contexts!r}")
    if size not in DEFAULTS:
        raise UserError(f"size: expected one of {list(DEFAULTS)}, got {size!r}")
    unknown = sorted(set(settings) - set(DEFAULTS[size]))
    if unknown:
        raise UserError(f"settings: unknown key(s) {unknown}; valid: {sorted(DEFAULTS[size])}")
    settings = {**DEFAULTS[size], **settings}
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    batch_sizes = list(batch_sizes or [1])
    if name != "decode" and batch_sizes != [1]:
        raise UserError(f"batch_sizes: only the decode study takes batch sizes, got {batch_sizes} for {name!r}")
    env = environment(device)
    names = list(dict.fromkeys(presets))
    if anchors and env["versions"]["transformers"] is not None:
        names += [a for a, preset in ANCHORS.items() if preset in names and a not in names]
    plan = [(model, context, batch) for model in names for context in sorted(contexts) for batch in batch_sizes]
    result: dict[str, Any] = {
        "study": name, "schema_version": 1, **env,
        "config": {"size": size, "dtype": str(dtype).removeprefix("torch."), "presets": names,
                   "contexts": sorted(contexts), "batch_sizes": batch_sizes, "cuda_graphs": cuda_graphs,
                   "max_seconds": max_seconds, **settings,
                   "flop_model": "6*N + 6*attention_blocks*d_model*T per training token (see revival/bench/models.py)"},
        "models": {}, "points": [],
    }
    start = time.perf_counter()
    bar = tqdm(plan, desc=f"bench {name}", disable=not progress, unit="point")
    runner = None
    context_lost = None  # a CUDA error that poisons the context: every later point is skipped
    for model_name, context, batch in bar:
        bar.set_postfix_str(f"{model_name} T={context} B={batch}")
        point: dict[str, Any] = {"model": model_name, "context": context, "batch": batch, "status": "ok", "error": None}
        if context_lost or (max_seconds is not None and time.perf_counter() - start > max_seconds):
            reason = f"CUDA context lost earlier: {context_lost}" if context_lost else \
                f"time budget of {max_seconds:.0f} s spent"
            point.update(status="skipped", error=reason)
            result["points"].append(point)
            continue
        try:
            if runner is None or runner.name != model_name:
                runner = _release(runner)
                runner = build_runner(model_name, size, device, torch.float32 if name == "train" else dtype,
                                      train=name == "train")
                result["models"][model_name] = model_record(runner)
            measure = {"train": _train_point, "prefill": _prefill_point, "decode": _decode_point}[name]
            with quiet_transformers() if model_name in ANCHORS else contextlib.nullcontext():
                point.update(measure(runner, context, batch, device, dtype, settings, cuda_graphs))
        except Exception as error:  # noqa: BLE001 - recorded per point; the study goes on
            if is_out_of_memory(error):
                point.update(status="oom", error=str(error).splitlines()[0][:300])
            else:
                point.update(status="error", error=f"{type(error).__name__}: {str(error)[:300]}")
        try:
            _free(device)
        except Exception as error:  # noqa: BLE001 - e.g. an illegal memory access reported late
            context_lost = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            point["error"] = (point["error"] or "") + f" [then: {context_lost}]"
            point["status"] = "error"
        if point["status"] == "error" and "CUDA error" in point["error"]:
            context_lost = context_lost or point["error"][:200]
        result["points"].append(point)
    try:
        _release(runner)
    except Exception:  # noqa: BLE001 - a lost CUDA context; the figures are still written below
        pass
    result["wall_seconds"] = time.perf_counter() - start
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = f"bench_{name}.png"
    write_json(result, out_dir / f"bench_{name}.json")  # the figures first: a plot failure loses nothing
    try:
        plot_study(result, out_dir / result["plot"])
    except Exception as error:  # noqa: BLE001 - e.g. matplotlib missing on a GPU box; the JSON says so
        result["plot"], result["plot_error"] = None, f"{type(error).__name__}: {error}"
        write_json(result, out_dir / f"bench_{name}.json")
    return result


# ------------------------------------------------------------------------------------------------ one point each
@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' deprecation notices (its logger and FutureWarnings) while an anchor is measured: they
    are about argument names, and they would interleave with the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            yield
            return
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)


def is_out_of_memory(error: BaseException) -> bool:
    """Out of device memory, also where cuBLAS reports it (a handle or workspace it could not allocate)."""
    return isinstance(error, torch.OutOfMemoryError) or "CUBLAS_STATUS_ALLOC_FAILED" in str(error)


def _train_point(runner, context, batch, device, dtype, settings, cuda_graphs) -> dict[str, Any]:
    """One optimizer step on tokens_per_step tokens. If the whole batch does not fit, the step is taken as gradient
    accumulation over 2, 4, ... micro-batches (same tokens per step; `micro_batches` records how many)."""
    batch = max(1, settings["tokens_per_step"] // context)
    ids = tokens_batch(runner.config.vocab_size, batch, context + 1, device)
    model = runner.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    micro_batches = 1
    try:
        while True:
            try:
                return _train_measure(runner, model, optimizer, ids, micro_batches, context, device, dtype, settings)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error) or micro_batches * 2 > batch:
                    raise
                micro_batches *= 2
                model.zero_grad(set_to_none=True)
                _free(device)
    finally:
        model.zero_grad(set_to_none=True)  # no gradients or optimizer moments carried into the next point
        del optimizer


def _train_measure(runner, model, optimizer, ids, micro_batches, context, device, dtype, settings) -> dict[str, Any]:
    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    losses = []
    batch = ids.shape[0]

    def step():
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro_ids in ids.chunk(micro_batches):
            with autocast():
                loss = runner.loss(micro_ids) * (micro_ids.shape[0] / batch)
            loss.backward()
            total = total + loss.detach()
        optimizer.step()
        losses.append(total)

    seconds, peak = _timed(step, device, settings["warmup"], settings["repeats"])
    tokens = batch * context
    flops = training_flops_per_token(runner.config, context)
    peak_device = peak_flops(device)
    final_loss = float(losses[-1])
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"loss is {final_loss} at T={context}")
    return {"batch": batch, "micro_batches": micro_batches, "tokens": tokens, "step_seconds": seconds,
            "tokens_per_s": tokens / seconds, "flops_per_token": flops,
            "mfu": flops * tokens / seconds / peak_device if peak_device else None, "peak_memory_bytes": peak,
            "loss": final_loss}


def _prefill_point(runner, context, batch, device, dtype, settings, cuda_graphs) -> dict[str, Any]:
    ids = tokens_batch(runner.config.vocab_size, batch, context, device)
    model = runner.model.eval()

    def prefill():
        with torch.no_grad():
            logits, _ = runner.prefill(ids)
        return logits

    graph_error, capture_peak = None, 0
    if cuda_graphs and device.type == "cuda" and runner.kind == "revival":
        _free(device)
        graphed, graph_error, capture_peak = _graphed_prefill(runner, ids, device)
        prefill = graphed or prefill
    seconds, peak = _timed(prefill, device, settings["warmup"], settings["repeats"])
    if peak is not None:
        peak = max(peak, capture_peak)
    del model
    return {"ttft_seconds": seconds, "tokens_per_s": batch * context / seconds, "peak_memory_bytes": peak,
            "cuda_graph": prefill.__name__ == "graphed", "cuda_graph_error": graph_error}


def _graphed_prefill(runner, ids, device):
    """(function replaying a CUDA graph of the prefill of `ids`, None, peak bytes allocated during the capture) or
    (None, why not, 0). A replay runs the same kernels as the eager call without the per-kernel launch work on the CPU,
    which dominates short prompts; the replayed logits are checked against an eager call before the graph is timed.
    A replay allocates nothing (its activations live in the graph's pool, allocated during the capture), so the
    capture's peak is the prefill's footprint."""
    with torch.no_grad():
        try:
            side = _side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    runner.prefill(ids)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            torch.cuda.reset_peak_memory_stats(device)
            with torch.cuda.graph(graph):
                static_logits, _ = runner.prefill(ids)
            capture_peak = torch.cuda.max_memory_allocated(device)
        except Exception as error:  # noqa: BLE001 - fall back to eager and say why
            return None, f"{type(error).__name__}: {str(error)[:200]}", 0

        def graphed():
            graph.replay()
            return static_logits

        expected = runner.prefill(ids)[0].float()
        difference = (graphed().float() - expected).abs().max().item()
    if not difference <= 1e-3 * max(1.0, expected.abs().max().item()):
        return None, f"graph replay differs from the eager prefill (max |difference| {difference:.3g})", 0
    return graphed, None, capture_peak


def _decode_point(runner, context, batch, device, dtype, settings, cuda_graphs) -> dict[str, Any]:
    from ..models.model import state_bytes

    runner.model.eval()
    vocab = runner.config.vocab_size
    ids = tokens_batch(vocab, batch, context, device)
    steps = settings["decode_tokens"]
    with torch.no_grad():
        _sync(device)
        begin = time.perf_counter()
        _, state = runner.prefill(ids)
        _sync(device)
        prefill_seconds = time.perf_counter() - begin
        bytes_held = state_bytes(state) if runner.kind == "revival" else None
        del ids
        _free(device)  # before any graph capture: emptying the cache after it broke replays (illegal address)
        use_graph = (cuda_graphs and device.type == "cuda" and runner.kind == "revival"
                     and "a" not in runner.config.pattern)
        step, graph_error = _graphed_step(runner, state, batch, device) if use_graph else (None, None)
        holder = {"state": None if step is not None else state}
        del state  # only the live state counts in the decode memory
        if step is None:

            def step(token):
                logits, holder["state"] = runner.step(token, holder["state"])
                return logits
        token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        for _ in range(settings["warmup"]):  # warm-up steps (attention caches grow by these tokens too)
            token = step(token).argmax(-1, keepdim=True)
        if step.__name__ != "graphed":
            _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        begin = time.perf_counter()
        for _ in range(steps):
            token = step(token).argmax(-1, keepdim=True)
        _sync(device)
        seconds = time.perf_counter() - begin
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"tokens_per_s": batch * steps / seconds, "step_seconds": seconds / steps, "decode_tokens": steps,
            "prefill_seconds": prefill_seconds, "peak_memory_bytes": peak, "state_bytes_after_prefill": bytes_held,
            "cuda_graph": step.__name__ == "graphed", "cuda_graph_error": graph_error}


def _graphed_step(runner, state, batch, device):
    """(step function replaying a CUDA graph of one decode step, None) or (None, the capture error)."""
    static_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
    static_state = _tree_map(lambda t: t.clone(), state)
    try:
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                runner.step(static_ids, _tree_map(lambda t: t.clone(), static_state))
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits, new_state = runner.step(static_ids, static_state)
            _tree_copy_(static_state, new_state)
    except Exception as error:  # noqa: BLE001 - fall back to eager and say why
        return None, f"{type(error).__name__}: {str(error)[:200]}"

    def graphed(token):
        static_ids.copy_(token)
        graph.replay()
        return static_logits

    mismatch = _graph_mismatch(runner, graphed, state, static_state, static_ids)
    return (None, mismatch) if mismatch else (graphed, None)


def _graph_mismatch(runner, graphed, state, static_state, static_ids, steps: int = 3) -> str | None:
    """Replays `steps` steps and runs them eagerly from the same state; None if the logits agree, else why not.
    The static state is restored afterwards. (Seen on an H100: a graph whose first step matched and later ones did
    not; such a graph must not be timed.)"""
    start = _tree_map(lambda t: t.clone(), static_state)
    token = torch.zeros_like(static_ids)
    eager_state = _tree_map(lambda t: t.clone(), state)
    for index in range(steps):
        replayed = graphed(token).float().clone()
        expected, eager_state = runner.step(token, eager_state)
        difference = (replayed - expected.float()).abs().max().item()
        if not difference <= 1e-3 * max(1.0, expected.float().abs().max().item()):
            _tree_copy_(static_state, start)
            return f"graph replay differs from the eager step at step {index} (max |difference| {difference:.3g})"
        token = expected.argmax(-1, keepdim=True)
    _tree_copy_(static_state, start)
    return None


# ------------------------------------------------------------------------------------------------ helpers
_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """The one side stream for graph warm-ups on `device`. cuBLAS keeps a workspace for every stream it has run on
    (tens of MB on an H100) for the life of the process, so a fresh stream per capture made every later point's peak
    memory read higher, by about 35 MB per earlier point, until PyTorch's pool of streams came round again."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16, "fp32": torch.float32,
             "float32": torch.float32}
    if dtype not in names:
        raise UserError(f"dtype: expected one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def _timed(fn, device, warmup: int, repeats: int) -> tuple[float, int | None]:
    """(median seconds of `repeats` calls after `warmup` calls, peak allocated bytes during the timed calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _release(runner):
    if runner is not None:
        del runner.model
    return None


def _tree_map(fn, tree):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, t) for t in tree)
    if tree is None:
        return None
    raise ValueError(f"state: expected tensors in nested lists/tuples, got {type(tree).__name__}")


def _tree_copy_(target, source) -> None:
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, (list, tuple)):
        for t, s in zip(target, source):
            _tree_copy_(t, s)
