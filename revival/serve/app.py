"""The HTTP side of `revival serve`: an OpenAI-compatible FastAPI app over an `Engine`.

    POST /v1/completions         prompt (text or token ids) -> text; SSE when "stream": true
    POST /v1/chat/completions    messages -> assistant message; SSE when "stream": true
    GET  /v1/models              the served model
    GET/POST /v1/states          list / save a named state (the state after a prompt, one safetensors file)
    POST /v1/states/{name}/load  put a saved state in the prefix cache; DELETE /v1/states/{name} removes it
    GET  /health, GET /metrics   liveness; Prometheus text (requests, tokens/s, queue depth, state memory)

Bad input is a 4xx with an OpenAI-style body {"error": {"message", "type", "param", "code"}}; unexpected errors are
a 500 with the same body, and the engine keeps running. Request fields are checked strictly: unknown fields are
refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Done, Engine, EngineError, Failed, SamplingParams, Token
from .snapshots import load_state, save_state

__all__ = ["create_app", "render_chat"]

STATE_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")
MAX_SEED = 2**63 - 1


# ------------------------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Sampling fields shared by both endpoints; null means the default (temperature 1, top_p 1, no top_k)."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    user: str | None = None


class CompletionBody(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # null: 16, as OpenAI's


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatBody(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class StateBody(_Body):
    name: str
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None


def render_chat(messages: list[ChatMessage]) -> str:
    """The default chat template: one "<|role|>\\ncontent\\n" block per message, then "<|assistant|>\\n".

    A follow-up conversation's prompt starts with the previous prompt plus the previous reply, so its state is found
    in the prefix cache and only the new message is prefilled.
    """
    return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


# ------------------------------------------------------------------------------------------------ errors
def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = ".".join(location)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown field {where!r} (this server accepts only the fields it implements)", where
    if not location and kind in ("model_attributes_type", "dict_type"):
        return "body: expected a JSON object (sent with Content-Type: application/json)", None
    if location and location[0] == "prompt" and kind != "missing":
        return (f"prompt: expected a non-empty string or a non-empty list of token ids (one prompt per request), "
                f"got {first.get('input')!r}"[:500], "prompt")
    if kind == "missing":
        return f"{where}: required field missing", where
    return f"{where or 'body'}: {first.get('msg')}, got {first.get('input')!r}"[:500], where or None


class _Delta:
    """Incremental text of generated ids: holds back a partial UTF-8 character and a partial stop string."""

    def __init__(self, tokenizer, stops: list[str], eos_id: int | None):
        self.tokenizer, self.stops, self.eos_id = tokenizer, stops, eos_id
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        if token != self.eos_id:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(text[:cut])
        hold = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        visible = text[: len(text) - hold]
        if visible.endswith("\ufffd"):  # maybe the first bytes of a character
            return ""
        return self._advance(visible)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta


class _AuthAndCount:
    """ASGI middleware: the API key check (all paths but /health) and request counts by path and status.

    A plain ASGI wrapper rather than `@app.middleware`, whose wrapping of `receive` hides client disconnects.
    """

    def __init__(self, app, api_key: str | None, counts: dict):
        self.app, self.api_key, self.counts = app, api_key, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key is not None and path != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                self._count(path, 401)
                response = _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
                return await response(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self._count(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)

    def _count(self, path: str, status: int) -> None:
        self.counts[(path, status)] = self.counts.get((path, status), 0) + 1


class _Events:
    """One request's engine events, handed to the event loop; cancels the request once the client has gone."""

    CHECK_EVERY = 0.5  # seconds between disconnect checks

    def __init__(self, request: Request):
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None
        self.checked_at = time.monotonic()

    def deliver(self, event) -> None:
        """Called on the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    async def next(self):
        while True:
            if time.monotonic() - self.checked_at >= self.CHECK_EVERY:
                self.checked_at = time.monotonic()
                if await self.request.is_disconnected():
                    self.handle.cancel()
                    raise asyncio.CancelledError
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=self.CHECK_EVERY)
            except asyncio.TimeoutError:
                pass


# ------------------------------------------------------------------------------------------------ the app
def create_app(engine: Engine, tokenizer, model_name: str = "revival", api_key: str | None = None,
               states_dir: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (already started); `states_dir` holds named states (None: off)."""
    app = FastAPI(title="revival serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    states_path = Path(states_dir) if states_dir is not None else None
    eos_id = getattr(tokenizer, "eos_id", None)
    counts: dict[tuple[str, int], int] = {}

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return _error(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, error: EngineError):
        return _error(error.status, error.message, error.param)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception):
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    app.add_middleware(_AuthAndCount, api_key=api_key, counts=counts)

    # -------------------------------------------------------------------------------------------- plumbing
    def sampling(body: _Sampling, max_tokens: int) -> SamplingParams:
        if body.model is not None and body.model != model_name:
            raise EngineError(404, f"model: {body.model!r} is not served here; this server serves {model_name!r}",
                              "model")
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else
                              float(body.temperature), top_k=body.top_k, top_p=None if top_p >= 1 else top_p,
                              repetition_penalty=1.0 if body.repetition_penalty is None else
                              float(body.repetition_penalty), seed=body.seed,
                              stop_tokens=() if eos_id is None else (eos_id,))

    def encode(prompt) -> list[int]:
        ids = list(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
        if not ids:
            raise EngineError(400, "prompt: encodes to no tokens", "prompt")
        return ids

    def submit(ids: list[int], params: SamplingParams, request: Request, prefill_only: bool = False) -> _Events:
        events = _Events(request)
        events.handle = engine.submit(ids, params, events.deliver, prefill_only=prefill_only)
        return events

    def stops_of(body: _Sampling) -> list[str]:
        return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])

    async def run(kind: str, body, ids: list[int], max_tokens: int, request: Request):
        params = sampling(body, max_tokens)
        events = submit(ids, params, request)
        handle = events.handle
        text = _Delta(tokenizer, stops_of(body), eos_id)
        response_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(stream(kind, body, ids, response_id, events, text),
                                     media_type="text/event-stream")
        pieces = []
        try:
            while True:
                event = await events.next()
                if isinstance(event, Token):
                    pieces.append(text.add(event.id))
                    if text.stopped:
                        handle.cancel()
                        return completion(kind, response_id, "".join(pieces), "stop", usage(ids, text, event))
                elif isinstance(event, Done):
                    if event.finish_reason == "timeout":
                        return _error(504, f"request timed out after {engine.config.request_timeout:g} s")
                    pieces.append(text.finish())
                    return completion(kind, response_id, "".join(pieces), event.finish_reason, usage(ids, text, event))
                else:
                    return _error(event.status, event.message)
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def usage(ids, text: _Delta, event) -> dict:
        completion_tokens = event.completion_tokens if isinstance(event, Done) else len(text.ids)
        cached = event.cached_tokens if isinstance(event, Done) else 0
        return {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    def completion(kind: str, response_id: str, text: str, finish_reason: str, usage_: dict) -> dict:
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
            obj = "text_completion"
        return {"id": response_id, "object": obj, "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": usage_}

    def chunk(kind: str, response_id: str, delta: str | None, finish_reason: str | None, first: bool) -> str:
        if kind == "chat":
            content = {"role": "assistant", "content": delta or ""} if first else (
                {"content": delta} if delta else {})
            choice = {"index": 0, "delta": content, "finish_reason": finish_reason, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
            obj = "text_completion"
        payload = {"id": response_id, "object": obj, "created": int(time.time()), "model": model_name,
                   "choices": [choice]}
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(kind, body, ids, response_id, events: _Events, text: _Delta):
        handle = events.handle
        first = True
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        try:
            while True:
                event = await events.next()
                if isinstance(event, Token):
                    delta = text.add(event.id)
                    if text.stopped:
                        handle.cancel()
                        yield chunk(kind, response_id, delta, "stop", first)
                        final = usage_chunk(kind, response_id, usage(ids, text, event))
                        break
                    if delta or first and kind == "chat":
                        yield chunk(kind, response_id, delta, None, first)
                        first = False
                elif isinstance(event, Done):
                    if event.finish_reason == "timeout":
                        message = f"request timed out after {engine.config.request_timeout:g} s"
                        yield f"data: {json.dumps({'error': {'message': message, 'code': 504}})}\n\n"
                        final = None
                        break
                    yield chunk(kind, response_id, text.finish(), event.finish_reason, first)
                    final = usage_chunk(kind, response_id, usage(ids, text, event))
                    break
                else:
                    yield f"data: {json.dumps({'error': {'message': event.message, 'code': event.status}})}\n\n"
                    final = None
                    break
            if include_usage and final is not None:
                yield final
            yield "data: [DONE]\n\n"
        finally:  # also on client disconnect (the generator is closed)
            handle.cancel()

    def usage_chunk(kind, response_id, usage_: dict) -> str:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        payload = {"id": response_id, "object": obj, "created": int(time.time()), "model": model_name,
                   "choices": [], "usage": usage_}
        return f"data: {json.dumps(payload)}\n\n"

    def chat_max_tokens(body: ChatBody) -> int:
        return body.max_completion_tokens or body.max_tokens or engine.config.max_tokens

    # -------------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "revival"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        return await run("completion", body, encode(body.prompt), body.max_tokens or 16, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        return await run("chat", body, encode(render_chat(body.messages)), chat_max_tokens(body), request)

    def state_file(name: str) -> Path:
        if states_path is None:
            raise EngineError(404, "named states are off on this server (start it with --states-dir DIR)")
        if not STATE_NAME.match(name):
            raise EngineError(400, f"name: expected 1-64 characters of letters, digits, '_', '-', '.', not starting "
                                   f"with '.', got {name!r}", "name")
        return states_path / f"{name}.safetensors"

    @app.get("/v1/states")
    async def list_states():
        if states_path is None or not states_path.is_dir():
            return {"object": "list", "data": []}
        files = sorted(states_path.glob("*.safetensors"))
        return {"object": "list", "data": [{"name": f.stem, "bytes": f.stat().st_size} for f in files]}

    @app.post("/v1/states")
    async def save_named_state(body: StateBody, request: Request):
        path = state_file(body.name)
        if (body.prompt is None) == (body.messages is None):
            raise EngineError(400, "give exactly one of 'prompt' and 'messages'", "prompt")
        ids = encode(body.prompt if body.prompt is not None else render_chat(body.messages))
        events = submit(ids, SamplingParams(max_tokens=1), request, prefill_only=True)
        event = await events.next()
        if isinstance(event, Failed):
            return _error(event.status, event.message)
        if event.snapshot is None:
            return _error(504, f"request timed out after {engine.config.request_timeout:g} s")
        size = await asyncio.to_thread(save_state, path, event.snapshot, engine.fingerprint)
        return {"name": body.name, "tokens": len(ids), "cached_tokens": event.cached_tokens, "bytes": size}

    @app.post("/v1/states/{name}/load")
    async def load_named_state(name: str):
        path = state_file(name)
        if not path.is_file():
            raise EngineError(404, f"no saved state named {name!r}")
        try:
            snapshot = await asyncio.to_thread(load_state, path, engine.fingerprint, engine.device)
        except ValueError as error:
            raise EngineError(400, str(error)) from None
        if snapshot.nbytes > engine.snapshots.max_bytes:
            raise EngineError(400, f"state {name!r} ({snapshot.nbytes} bytes) is larger than the snapshot cache "
                                   f"({engine.snapshots.max_bytes} bytes, --snapshot-memory)")
        engine.snapshots.put(snapshot)
        return {"name": name, "tokens": len(snapshot.tokens), "bytes": snapshot.nbytes}

    @app.delete("/v1/states/{name}")
    async def delete_named_state(name: str):
        path = state_file(name)
        if not path.is_file():
            raise EngineError(404, f"no saved state named {name!r}")
        path.unlink()
        return {"name": name, "deleted": True}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine.stats(), counts), media_type="text/plain; version=0.0.4")

    return app


def prometheus_text(stats: dict, counts: dict[tuple[str, int], int]) -> str:
    """The Prometheus exposition text of the engine's stats and the per-path/status request counts."""
    lines = ["# HELP revival_http_requests_total HTTP requests by path and status.",
             "# TYPE revival_http_requests_total counter"]
    for (path, status), count in sorted(counts.items()):
        lines.append(f'revival_http_requests_total{{path="{path}",status="{status}"}} {count}')
    gauges = {"queue_depth": "Requests waiting for a slot.", "active_slots": "Slots decoding.",
              "prefilling": "Requests being prefilled.", "num_slots": "Slots in the pool.",
              "state_pool_bytes": "Bytes of the slot pool's state (recurrent state and attention caches).",
              "snapshot_bytes": "Bytes of cached prefix snapshots.", "snapshots": "Cached prefix snapshots.",
              "tokens_per_second": "Generated tokens per second over the last 10 s.",
              "cuda_graphs": "1 when decode steps replay CUDA graphs."}
    for name, text in gauges.items():
        lines += [f"# HELP revival_{name} {text}", f"# TYPE revival_{name} gauge", f"revival_{name} {stats[name]}"]
    for name in ("generated_tokens", "prefill_tokens", "cached_prompt_tokens", "decode_steps", "snapshot_hits",
                 "snapshot_misses", "rejected_queue_full", "step_errors", "requests_stop", "requests_length",
                 "requests_timeout", "requests_cancelled"):
        lines += [f"# TYPE revival_{name}_total counter", f"revival_{name}_total {stats.get(name, 0)}"]
    return "\n".join(lines) + "\n"
