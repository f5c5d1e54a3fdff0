"""The serving engine: continuous batching over a fixed pool of state slots, on one background thread.

Each iteration of the loop:

    1. admit waiting requests while slots are free (at most `num_slots` prefilling + decoding);
    2. prefill up to `prefill_chunk` prompt tokens (batch 1, state carried, starting from the longest cached prefix
       snapshot); a request whose prompt is done samples its first token and joins the decode batch;
    3. one decode step for every active slot at once (a CUDA graph per batch bucket on GPU), then sampling.

Active slots stay packed in rows [0, n): a finished request's row is refilled with the last row's state. Sampling
matches `revival.generate` token for token: each seeded request owns a `torch.Generator` seeded like `generate`'s,
and its row is sampled alone by the same `sample_next` call; unseeded requests with the same sampling options are
sampled together from the engine's generator.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate.sampling import sample_next
from .slots import SlotPool, map_tensors
from .snapshots import Snapshot, SnapshotCache

__all__ = ["Engine", "EngineConfig", "EngineError", "SamplingParams", "Token", "Done", "Failed"]


class EngineError(Exception):
    """A request refused by the engine: `status` is the HTTP status to answer (400 bad input, 429 queue full)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass(frozen=True)
class SamplingParams:
    """What `revival.generate.generate` takes: max_tokens new tokens, stop after any of `stop_tokens` (included)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_tokens: tuple[int, ...] = ()


@dataclass
class EngineConfig:
    """Limits and sizes of the engine (the `revival serve` options of the same names)."""

    num_slots: int = 16  # requests decoded together
    max_prompt_tokens: int = 8192
    max_tokens: int = 2048  # per request generation limit
    max_queue: int = 64  # waiting requests beyond the slots; more are refused (429)
    prefill_chunk: int = 512  # prompt tokens per loop iteration (keeps decode steps flowing during long prefills)
    snapshot_bytes: int = 1 << 30  # prefix snapshot cache size (0 = off)
    request_timeout: float = 600.0  # seconds from submission
    cuda_graphs: bool = True  # on CUDA devices only

    def __post_init__(self):
        for name in ("num_slots", "max_prompt_tokens", "max_tokens", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not self.request_timeout > 0:
            raise ValueError(f"request_timeout: expected a number of seconds > 0, got {self.request_timeout!r}")

    @property
    def max_len(self) -> int:
        """Positions an attention cache holds per slot: a full prompt plus a full generation."""
        return self.max_prompt_tokens + self.max_tokens


# ------------------------------------------------------------------------------------------------------ events
@dataclass(frozen=True)
class Token:
    id: int


@dataclass(frozen=True)
class Done:
    """finish_reason: "stop" (a stop token), "length" (max_tokens), "timeout"; `snapshot` only for prefill-only."""

    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    snapshot: Snapshot | None = None


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[object], None]
    deadline: float
    prefill_only: bool = False
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    history: torch.Tensor | None = None  # prompt + generated, kept only for a repetition penalty
    position: int = 0  # prompt tokens prefilled so far
    cached_tokens: int = 0
    state: list | None = None  # batch-1 prefill state until the request joins the pool
    logits: torch.Tensor | None = None  # (V,) logits of the last prefilled token

    def cancel(self) -> None:
        """Ask the engine to drop this request (client gone); its slot is freed on the next iteration."""
        self.cancelled = True


class Engine:
    """Owns the model on one thread; `submit` is thread-safe and returns at once."""

    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.device = model.device
        self.vocab_size = model.config.vocab_size
        self.snapshots = SnapshotCache(self.config.snapshot_bytes)
        self.fingerprint = model_fingerprint(model)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._prefilling: list[_Request] = []
        self._active: list[_Request] = []
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_error: str | None = None
        self.pool: SlotPool | None = None
        self.input_ids: torch.Tensor | None = None
        self.metrics = collections.Counter()
        self._token_times: collections.deque[tuple[float, int]] = collections.deque()

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        """Allocate the slot pool (and capture the CUDA graphs) on the engine thread; returns when it is ready."""
        self._thread = threading.Thread(target=self._run, name="revival-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join()
        for request in self._all_requests():
            request.on_event(Failed(503, "the server is shutting down"))

    @property
    def uses_cuda_graphs(self) -> bool:
        return bool(self._graphs)

    # ------------------------------------------------------------------------------------------ submission
    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable[[object], None],
               prefill_only: bool = False) -> _Request:
        """Queue a request; `on_event` is called on the engine thread with Token, then Done or Failed.

        `prefill_only`: no tokens are generated; Done carries the prompt's snapshot (used to save a named state).
        Raises EngineError(400) for bad ids/limits, EngineError(429) when the queue is full. The returned request's
        `cancel()` drops it (its slot is freed on the next loop iteration).
        """
        self._check(prompt, params, prefill_only)
        request = _Request(list(prompt), params, on_event, time.monotonic() + self.config.request_timeout,
                           prefill_only=prefill_only)
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                self.metrics["rejected_queue_full"] += 1
                raise EngineError(429, f"the request queue is full ({self.config.max_queue} waiting); retry later")
            self._waiting.append(request)
        self._wakeup.set()
        return request

    def generate(self, prompt: list[int], params: SamplingParams, timeout: float | None = None) -> tuple[list, Done]:
        """Blocking convenience: (generated ids, Done); raises EngineError for a Failed request."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        self.submit(prompt, params, events.put)
        tokens = []
        while True:
            event = events.get(timeout=timeout)
            if isinstance(event, Token):
                tokens.append(event.id)
            elif isinstance(event, Done):
                return tokens, event
            else:
                raise EngineError(event.status, event.message)

    def _check(self, prompt, params: SamplingParams, prefill_only: bool) -> None:
        config = self.config
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise EngineError(400, "prompt: expected at least one token, got an empty prompt", "prompt")
        if len(prompt) > config.max_prompt_tokens:
            raise EngineError(400, f"prompt: {len(prompt)} tokens exceed this server's max_prompt_tokens "
                                   f"{config.max_prompt_tokens}", "prompt")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(400, f"prompt: token ids must be integers in [0, {self.vocab_size}), got {bad[0]!r}",
                              "prompt")
        if not prefill_only and not 1 <= params.max_tokens <= config.max_tokens:
            raise EngineError(400, f"max_tokens: expected an integer in [1, {config.max_tokens}], got "
                                   f"{params.max_tokens}", "max_tokens")

    # ------------------------------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            with torch.no_grad():
                self.pool = SlotPool(self.model, self.config.num_slots, self.config.max_len)
                self.input_ids = torch.zeros(self.config.num_slots, 1, dtype=torch.long, device=self.device)
                if self.config.cuda_graphs and self.device.type == "cuda":
                    try:
                        self._capture_graphs()
                    except Exception as error:  # eager decoding still works; say why graphs are off
                        self._graphs.clear()
                        self.graph_error = f"{type(error).__name__}: {error}"
        except BaseException as error:  # reported by start()
            self._start_error = error
            self._started.set()
            return
        self._started.set()
        while not self._stopping:
            try:
                with torch.no_grad():
                    busy = self._iteration()
            except Exception as error:  # a failing step fails the requests in flight, never the server
                self._fail_in_flight(error)
                busy = True
            if not busy:
                self._wakeup.wait(0.05)
                self._wakeup.clear()

    def _iteration(self) -> bool:
        self._drop_finished_waiting()
        with self._lock:
            while self._waiting and len(self._prefilling) + len(self._active) < self.config.num_slots:
                self._prefilling.append(self._waiting.popleft())
        now = time.monotonic()
        for request in list(self._prefilling):
            if request.cancelled or now > request.deadline:
                self._prefilling.remove(request)
                self._end(request, "timeout" if not request.cancelled else "cancelled")
        for index in reversed(range(len(self._active))):
            request = self._active[index]
            if request.cancelled or now > request.deadline:
                self._leave(index, "timeout" if not request.cancelled else "cancelled", snapshot=False)
        busy = False
        if self._prefilling:
            self._prefill_step()
            busy = True
        if self._active:
            self._decode_step()
            busy = True
        return busy

    def _drop_finished_waiting(self) -> None:
        now = time.monotonic()
        with self._lock:
            keep = collections.deque()
            for request in self._waiting:
                if request.cancelled or now > request.deadline:
                    self._end(request, "timeout" if not request.cancelled else "cancelled")
                else:
                    keep.append(request)
            self._waiting = keep

    # ------------------------------------------------------------------------------------------ prefill
    def _prefill_step(self) -> None:
        """Up to `prefill_chunk` prompt tokens, first come first served."""
        budget = self.config.prefill_chunk
        while budget > 0 and self._prefilling:
            request = self._prefilling[0]
            try:
                budget -= self._prefill_chunk(request, budget)
            except Exception as error:  # this request only
                self._prefilling.pop(0)
                request.on_event(Failed(500, f"prefill failed: {type(error).__name__}: {error}"))
                continue
            if request.position == len(request.prompt):
                self._prefilling.pop(0)
                self._prompt_done(request)

    def _prefill_chunk(self, request: _Request, budget: int) -> int:
        """Advance one request's prefill by at most `budget` tokens; returns the tokens run."""
        if request.position == 0 and request.state is None:
            snapshot = self.snapshots.lookup(request.prompt)
            if snapshot is not None:
                request.state, request.logits = snapshot.state, snapshot.logits
                request.position = request.cached_tokens = len(snapshot.tokens)
                self.metrics["cached_prompt_tokens"] += request.cached_tokens
                if request.position == len(request.prompt):
                    return 0
        chunk = request.prompt[request.position:request.position + budget]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits, request.state = self.model(ids, request.state)
        request.logits = logits[0, -1].clone()  # a copy: a view would keep the whole (1, T, V) chunk alive
        request.position += len(chunk)
        self.metrics["prefill_tokens"] += len(chunk)
        return len(chunk)

    def _prompt_done(self, request: _Request) -> None:
        new_prefix = request.cached_tokens < len(request.prompt)
        if request.prefill_only or (new_prefix and self.snapshots.max_bytes):
            # compact copies: a layer's returned state may be a view into a larger prefill buffer
            snapshot = Snapshot(tuple(request.prompt), map_tensors(torch.clone, request.state), request.logits)
            if new_prefix:
                self.snapshots.put(snapshot)
        if request.prefill_only:
            request.on_event(Done("length", len(request.prompt), request.cached_tokens, 0, snapshot=snapshot))
            return
        params = request.params
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device)
            request.generator.manual_seed(params.seed)
        if params.repetition_penalty != 1.0:
            request.history = torch.tensor([request.prompt], dtype=torch.long, device=self.device)
        token = self._sample(request.logits[None], [request])
        # take the slot before the first token goes out: a client that sees it also sees the slot in use
        slot = len(self._active)
        self.pool.write(slot, request.state)
        self.input_ids[slot, 0] = token[0]
        request.state = request.logits = None
        self._active.append(request)
        if self._emit(request, int(token[0])):
            self._leave(slot, self._finish_reason(request), snapshot=False)

    # ------------------------------------------------------------------------------------------ decode
    def _bucket(self, n: int) -> int:
        if not self._graphs:
            return n
        return min(size for size in self._graphs if size >= n)

    def _decode_eager(self, rows: int) -> torch.Tensor:
        logits, new_state = self.model(self.input_ids[:rows], self.pool.view(rows))
        self.pool.update(rows, new_state)
        return logits[:, -1]

    def _capture_graphs(self) -> None:
        """One CUDA graph per batch bucket (1, 2, 4, ..., num_slots), captured on the idle pool at start."""
        sizes = sorted({min(2 ** i, self.config.num_slots) for i in range(self.config.num_slots.bit_length() + 1)})
        memory_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)
        for rows in reversed(sizes):
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up runs (allocations, autotuning) before capture
                    self._decode_eager(rows)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                logits = self._decode_eager(rows)
            self._graphs[rows] = (graph, logits)
        torch.cuda.synchronize(self.device)

    def _decode_step(self) -> None:
        n = len(self._active)
        rows = self._bucket(n)
        if self._graphs:
            graph, logits = self._graphs[rows]
            graph.replay()
        else:
            logits = self._decode_eager(rows)
        logits = logits[:n]
        tokens = self._sample(logits, self._active)
        self.input_ids[:n, 0] = tokens
        self.metrics["decode_steps"] += 1
        finished = [i for i, (request, token) in enumerate(zip(self._active, tokens.tolist()))
                    if self._emit(request, token)]
        for index in reversed(finished):
            request = self._active[index]
            self._leave(index, self._finish_reason(request), snapshot=True, logits=logits[index])

    def _leave(self, index: int, reason: str, snapshot: bool, logits: torch.Tensor | None = None) -> None:
        """Finish the request in row `index`, keep the active rows packed (the last row moves into the hole)."""
        request = self._active[index]
        if snapshot and self.snapshots.max_bytes:
            # the row's state covers prompt + generated[:-1]: the last token was sampled, not yet fed
            fed = tuple(request.prompt + request.generated[:-1])
            self.snapshots.put(Snapshot(fed, self.pool.read(index), logits.clone()))
        last = len(self._active) - 1
        self.pool.move(last, index)
        self.input_ids[index] = self.input_ids[last]
        self._active[index] = self._active[last]
        self._active.pop()
        self._end(request, reason)

    # ------------------------------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor, requests: list[_Request]) -> torch.Tensor:
        """One token per row of logits (n, V), as `revival.generate.sample_next` draws it for each request."""
        tokens = torch.empty(len(requests), dtype=torch.long, device=self.device)
        shared: dict[tuple, list[int]] = {}
        for row, request in enumerate(requests):
            p = request.params
            if request.generator is not None or request.history is not None:
                history = request.history if request.history is not None else tokens.new_zeros(1, 0)
                tokens[row:row + 1] = sample_next(logits[row:row + 1], history, p.temperature, p.top_k, p.top_p,
                                                  p.repetition_penalty, request.generator)
            else:
                shared.setdefault((p.temperature, p.top_k, p.top_p), []).append(row)
        no_history = tokens.new_zeros(len(requests), 0)
        for (temperature, top_k, top_p), rows in shared.items():
            if len(rows) == len(requests):
                tokens = sample_next(logits, no_history, temperature, top_k, top_p, 1.0, self._generator)
            else:
                index = torch.tensor(rows, device=self.device)
                tokens[index] = sample_next(logits[index], no_history[: len(rows)], temperature, top_k, top_p, 1.0,
                                            self._generator)
        return tokens

    def _emit(self, request: _Request, token: int) -> bool:
        """Deliver a sampled token; True when the request is finished."""
        request.generated.append(token)
        if request.history is not None:
            request.history = torch.cat([request.history, request.history.new_tensor([[token]])], dim=1)
        self.metrics["generated_tokens"] += 1
        now = time.monotonic()
        self._token_times.append((now, 1))
        while self._token_times and self._token_times[0][0] < now - 10.0:
            self._token_times.popleft()
        request.on_event(Token(token))
        return len(request.generated) >= request.params.max_tokens or token in request.params.stop_tokens

    @staticmethod
    def _finish_reason(request: _Request) -> str:
        return "stop" if request.generated and request.generated[-1] in request.params.stop_tokens else "length"

    def _end(self, request: _Request, reason: str) -> None:
        self.metrics["requests_" + reason] += 1
        if reason != "cancelled":
            request.on_event(Done(reason, len(request.prompt), request.cached_tokens, len(request.generated)))

    def _all_requests(self) -> list[_Request]:
        with self._lock:
            return [*self._waiting, *self._prefilling, *self._active]

    def _fail_in_flight(self, error: Exception) -> None:
        message = f"decoding failed: {type(error).__name__}: {error}"
        for request in self._prefilling + self._active:
            request.on_event(Failed(500, message))
        self.metrics["step_errors"] += 1
        self._prefilling, self._active = [], []

    # ------------------------------------------------------------------------------------------ metrics
    def stats(self) -> dict:
        """Numbers for /metrics: counters, queue depth, slots in use, state memory, recent tokens/s."""
        now = time.monotonic()
        recent = sum(n for t, n in self._token_times if t >= now - 10.0)
        return {
            "queue_depth": len(self._waiting),
            "prefilling": len(self._prefilling),
            "active_slots": len(self._active),
            "num_slots": self.config.num_slots,
            "state_pool_bytes": self.pool.nbytes() if self.pool is not None else 0,
            "snapshot_bytes": self.snapshots.nbytes,
            "snapshots": len(self.snapshots),
            "snapshot_hits": self.snapshots.hits,
            "snapshot_misses": self.snapshots.misses,
            "tokens_per_second": recent / 10.0,
            "cuda_graphs": int(self.uses_cuda_graphs),
            **dict(self.metrics),
        }


def model_fingerprint(model) -> str:
    """A short hash of the config and a checksum of two weight tensors (named states are tied to it)."""
    parameters = list(model.parameters())
    sums = [float(parameters[0].detach().double().sum()), float(parameters[-1].detach().double().sum())]
    text = json.dumps({"config": model.config.to_dict(), "sums": sums}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
