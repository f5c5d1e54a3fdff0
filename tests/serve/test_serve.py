"""`revival serve`: slot pool, engine vs `generate`, the HTTP API through the `openai` client, snapshots, bad input.

A tiny float64 hybrid (xLSTM-large mixer + attention, byte tokenizer) served on loopback by uvicorn in a thread.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
try:
    import openai
except ImportError:  # the engine and HTTP tests run without it (e.g. the CUDA-graph test on a GPU box)
    openai = None
import uvicorn  # noqa: E402

from revival import LanguageModel, ModelConfig  # noqa: E402
from revival.data.tokenizers import ByteTokenizer  # noqa: E402
from revival.serve.app import create_app, render_chat  # noqa: E402
from revival.serve.engine import Engine, EngineConfig, SamplingParams, Token  # noqa: E402
from revival.serve.slots import SlotKVCache, SlotPool  # noqa: E402
from revival.serve.snapshots import Snapshot, SnapshotCache  # noqa: E402

TOKENIZER = ByteTokenizer()
needs_openai = pytest.mark.skipif(openai is None, reason="the openai client package is not installed")
EOS = TOKENIZER.eos_id
WAIT = 30.0  # seconds any single wait may take


def tiny_model(pattern: str = "xa", seed: int = 0, d_model: int = 32, chunk_size: int = 8) -> LanguageModel:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=d_model, num_heads=2, pattern=pattern,
                         chunk_size=chunk_size)
    model = LanguageModel(config).double().eval()
    with torch.no_grad():  # a peaked, input-dependent distribution: greedy and sampled paths differ
        model.lm_head.weight.mul_(8.0)
    return model


class Server:
    """uvicorn serving an app on 127.0.0.1 (an ephemeral port) in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(WAIT)


def wait_until(condition, what: str):
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@dataclass
class Served:
    engine: Engine
    url: str
    states_dir: Path


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    """8 slots, prompts prefilled 5 tokens at a time (so most prompts take several chunks)."""
    engine = Engine(model, EngineConfig(num_slots=8, max_prompt_tokens=256, max_tokens=48, prefill_chunk=5,
                                        max_queue=64)).start()
    states_dir = tmp_path_factory.mktemp("states")
    server = Server(create_app(engine, TOKENIZER, model_name="tiny", states_dir=states_dir))
    yield Served(engine, server.url, states_dir)
    server.close()
    engine.stop()


def reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    out = model.generate(prompt, params.max_tokens, temperature=params.temperature, top_k=params.top_k,
                         top_p=params.top_p, repetition_penalty=params.repetition_penalty,
                         stop_tokens=list(params.stop_tokens) or None, seed=params.seed)
    return out[len(prompt):].tolist()


def text_of(ids: list[int]) -> str:
    return TOKENIZER.decode([i for i in ids if i != EOS])


def mixed_requests(count: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        prompt = torch.randint(0, 256, (2 + i % 13,), generator=generator).tolist()
        params = SamplingParams(max_tokens=4 + i % 17, temperature=(0.0, 1.0, 0.7)[i % 3],
                                top_k=(None, 20)[i % 2], top_p=(None, 0.9)[(i // 2) % 2],
                                repetition_penalty=1.3 if i % 7 == 0 else 1.0, seed=100 + i, stop_tokens=(EOS,))
        requests.append((prompt, params))
    return requests


# ------------------------------------------------------------------------------------------------ slot pool
def test_slot_kv_cache_matches_the_growing_cache_for_rows_of_different_lengths():
    model = tiny_model("a")
    attention = model.blocks[0].mixer
    lengths = [3, 7, 1]
    xs = [torch.randn(1, n + 1, 32, dtype=torch.float64) for n in lengths]
    cache = SlotKVCache(torch.zeros(3, 2, 12, 16, dtype=torch.float64), torch.zeros(3, 2, 12, 16, dtype=torch.float64),
                        torch.zeros(3, dtype=torch.long))
    expected = []
    with torch.no_grad():
        for row, (n, x) in enumerate(zip(lengths, xs)):
            _, (k, v) = attention(x[:, :n])  # the reference: a (1, Hkv, n, hd) cache grown by torch.cat
            cache.k[row, :, :n], cache.v[row, :, :n], cache.lengths[row] = k[0], v[0], n
            expected.append(attention(x[:, n:], (k, v))[0])
        y, _ = attention(torch.cat([x[:, -1:] for x in xs]), cache)
    torch.testing.assert_close(y, torch.cat(expected), rtol=1e-12, atol=1e-12)
    assert cache.lengths.tolist() == [n + 1 for n in lengths]


def test_slot_pool_write_read_move_and_batched_step_equal_single_rows():
    model = tiny_model("xaM")
    pool = SlotPool(model, num_slots=4, max_len=16)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    states, nexts = [], []
    with torch.no_grad():
        for slot, prompt in enumerate(prompts):
            _, state = model(torch.tensor([prompt]))
            pool.write(slot, state)
            states.append(state)
            nexts.append(model(torch.tensor([[10 + slot]]), state))
        for slot, state in enumerate(states):  # read gives back what was written
            for got, want in zip(pool.read(slot), state):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
        ids = torch.tensor([[10], [11], [12]])
        logits, new_state = model(ids, pool.view(3))
        pool.update(3, new_state)
    for slot, (want_logits, want_state) in enumerate(nexts):
        torch.testing.assert_close(logits[slot:slot + 1], want_logits, rtol=1e-12, atol=1e-12)
        for got, want in zip(pool.read(slot), want_state):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    pool.move(2, 0)
    for got, want in zip(pool.read(0), nexts[2][1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_snapshot_cache_returns_the_longest_prefix_and_evicts_by_bytes():
    logits = torch.zeros(4)
    cache = SnapshotCache(max_bytes=3 * 80)
    for tokens in ([1, 2], [1, 2, 3], [1, 2, 3, 4, 5]):
        cache.put(Snapshot(tuple(tokens), [torch.zeros(12)], logits))
    assert cache.lookup([1, 2, 3, 4, 9]).tokens == (1, 2, 3)
    assert cache.lookup([1, 2, 3, 4, 5, 6]).tokens == (1, 2, 3, 4, 5)
    assert cache.lookup([2, 1]) is None
    cache.put(Snapshot((7, 7), [torch.zeros(12)], logits))  # over budget: the least recently used ([1, 2]) goes
    assert len(cache) == 3 and cache.lookup([1, 2, 9]) is None and cache.nbytes <= 3 * 80


# ------------------------------------------------------------------------------------------------ engine
def test_32_concurrent_requests_equal_generate_token_for_token(model, served):
    engine = served.engine
    requests = mixed_requests(32)
    done = threading.Event()
    results: dict[int, list] = {i: [] for i in range(32)}
    finished: dict[int, object] = {}

    def collector(i):
        def on_event(event):
            if hasattr(event, "id"):
                results[i].append(event.id)
            else:
                finished[i] = event
                if len(finished) == 32:
                    done.set()
        return on_event

    for i, (prompt, params) in enumerate(requests):  # all queued at once: 8 slots, the rest wait and join later
        engine.submit(prompt, params, collector(i))
    assert done.wait(WAIT), f"only {len(finished)} of 32 finished"
    for i, (prompt, params) in enumerate(requests):
        assert results[i] == reference(model, prompt, params), f"request {i}"
        assert finished[i].finish_reason == ("stop" if results[i][-1] == EOS else "length")


def test_a_follow_up_prefills_only_its_new_tokens_and_matches_generate(model, served):
    engine = served.engine
    params = SamplingParams(max_tokens=9, temperature=1.0, seed=7)
    first = [11, 12, 13, 14, 15, 16, 17]
    reply, done = engine.generate(first, params, timeout=WAIT)
    follow_up = first + reply + [40, 41, 42]
    before = engine.metrics["prefill_tokens"]
    tokens, done = engine.generate(follow_up, params, timeout=WAIT)
    assert done.cached_tokens == len(first) + len(reply) - 1  # the last reply token was sampled, never fed
    assert engine.metrics["prefill_tokens"] - before == 4
    assert tokens == reference(model, follow_up, params)
    again, done = engine.generate(follow_up, params, timeout=WAIT)  # the whole prompt cached: no prefill at all
    assert done.cached_tokens == len(follow_up) and again == tokens


# ------------------------------------------------------------------------------------------------ HTTP API
@needs_openai
def test_openai_client_32_concurrent_completions_streamed_or_not_equal_generate(model, served):
    url = served.url
    requests = mixed_requests(32, seed=2)

    async def one(client, i, prompt, params):
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=params.max_tokens, temperature=params.temperature,
                      top_p=params.top_p or 1.0, seed=params.seed,
                      extra_body={"top_k": params.top_k, "repetition_penalty": params.repetition_penalty})
        if i % 2:
            chunks = await client.completions.create(stream=True, **kwargs)
            return "".join([c.choices[0].text async for c in chunks if c.choices])
        return (await client.completions.create(**kwargs)).choices[0].text

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT) as client:
            return await asyncio.gather(*(one(client, i, p, s) for i, (p, s) in enumerate(requests)))

    texts = asyncio.run(all_of_them())
    for i, ((prompt, params), text) in enumerate(zip(requests, texts)):
        assert text == text_of(reference(model, prompt, params)), f"request {i}"


@needs_openai
def test_chat_completion_streaming_usage_and_follow_up_cache(model, served):
    url = served.url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=3, stop_tokens=(EOS,))
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.8, seed=3)
    from revival.serve.app import ChatMessage

    prompt = TOKENIZER.encode(render_chat([ChatMessage(**m) for m in messages]))
    expected = reference(model, prompt, params)
    assert reply.choices[0].message.content == text_of(expected)
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(expected)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0.8,
                                                 seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_of(expected)
    assert chunks[-1].usage.completion_tokens == len(expected)
    # the next turn starts with this turn's prompt, so at least that is cached; the reply too when its text
    # re-encodes to the same tokens (random bytes from an untrained model need not be valid UTF-8)
    turn = messages + [{"role": "assistant", "content": text_of(expected)}, {"role": "user", "content": "ok"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=5, temperature=0.8, seed=4)
    reply_round_trips = TOKENIZER.encode(text_of(expected)) == [t for t in expected if t != EOS]
    fed = len(prompt) + len(expected) - 1 if reply_round_trips and EOS not in expected else len(prompt)
    assert second.usage.prompt_tokens_details.cached_tokens >= fed


@needs_openai
def test_stop_strings_cut_the_text_before_the_stop(model, served):
    url = served.url
    prompt = [65, 66, 67]
    params = SamplingParams(max_tokens=30, temperature=0.0, stop_tokens=(EOS,))
    full = text_of(reference(model, prompt, params))
    stop = full[5:7]
    assert len(stop) == 2
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=WAIT)
    result = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert result.choices[0].text == full[: full.find(stop)] and result.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]


def test_named_state_saved_and_loaded_into_a_fresh_server_gives_identical_tokens(model, served, tmp_path):
    url = served.url
    prompt = [70, 71, 72, 73, 74, 75]
    saved = httpx.post(url + "/v1/states", json={"name": "greeting", "prompt": prompt}, timeout=WAIT)
    assert saved.status_code == 200, saved.text
    assert saved.json()["tokens"] == len(prompt)
    names = [s["name"] for s in httpx.get(url + "/v1/states", timeout=WAIT).json()["data"]]
    assert "greeting" in names
    engine = Engine(model, EngineConfig(num_slots=2, max_prompt_tokens=96, max_tokens=48)).start()
    source = served.states_dir
    server = Server(create_app(engine, TOKENIZER, model_name="tiny", states_dir=source))
    try:
        loaded = httpx.post(server.url + "/v1/states/greeting/load", timeout=WAIT)
        assert loaded.status_code == 200, loaded.text
        body = {"model": "tiny", "prompt": prompt + [76, 77], "max_tokens": 8, "temperature": 1.0, "seed": 5}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=WAIT).json()
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=5, stop_tokens=(EOS,))
        assert answer["choices"][0]["text"] == text_of(reference(model, prompt + [76, 77], params))
    finally:
        server.close()
        engine.stop()
    other = Engine(tiny_model(seed=1), EngineConfig(num_slots=1, max_prompt_tokens=8, max_tokens=4)).start()
    server = Server(create_app(other, TOKENIZER, model_name="tiny", states_dir=source))
    try:
        refused = httpx.post(server.url + "/v1/states/greeting/load", timeout=WAIT)
        assert refused.status_code == 400 and "another model" in refused.json()["error"]["message"]
    finally:
        server.close()
        other.stop()


# ------------------------------------------------------------------------------------------------ limits, bad input
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A recurrent-only model, one slot, a 2 s request timeout, an API key."""
    engine = Engine(tiny_model("x"), EngineConfig(num_slots=1, max_prompt_tokens=16, max_tokens=100_000,
                                                  request_timeout=2.0)).start()
    server = Server(create_app(engine, TOKENIZER, model_name="tiny", api_key=KEY,
                               states_dir=tmp_path_factory.mktemp("limited-states")))
    yield Served(engine, server.url, None)
    server.close()
    engine.stop()


def post(url: str, path: str, timeout: float = WAIT, **kwargs) -> httpx.Response:
    return httpx.post(url + path, headers=AUTH, timeout=timeout, **kwargs)


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "body: expected a JSON object"),
    ({"prompt": "a", "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ({"max_tokens": 3}, 400, "prompt: required"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "token ids must be integers in [0, 257)"),
    ({"prompt": [1, 257]}, 400, "token ids must be integers in [0, 257)"),
    ({"prompt": [1.5]}, 400, "prompt: expected a non-empty string or a non-empty list of token ids"),
    ({"prompt": [True]}, 400, "prompt: expected"),
    ({"prompt": ["two", "prompts"]}, 400, "one prompt per request"),
    ({"prompt": list(range(17))}, 400, "max_prompt_tokens 16"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 100_001}, 400, "max_tokens: expected an integer in [1, 100000]"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "temperature": 2.5}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_k": 0}, 400, "top_k"),
    ({"prompt": "a", "seed": -1}, 400, "seed"),
    ({"prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "a", "model": "gpt-9"}, 404, "'gpt-9' is not served here"),
])
def test_bad_completion_requests_get_a_4xx_with_a_clear_message(limited, body, status, says):
    kwargs = {"content": body, "headers": {**AUTH, "content-type": "application/json"}} if isinstance(
        body, bytes) else {"json": body, "headers": AUTH}
    response = httpx.post(limited.url + "/v1/completions", timeout=WAIT, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["code"] == status


def test_bad_chat_and_state_requests(limited):
    assert post(limited.url, "/v1/chat/completions", json={"messages": []}).status_code == 400
    wrong_role = post(limited.url, "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert wrong_role.status_code == 400 and "role" in wrong_role.json()["error"]["message"]
    both = post(limited.url, "/v1/states", json={"name": "s", "prompt": "a", "messages": [
        {"role": "user", "content": "b"}]})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    bad_name = post(limited.url, "/v1/states", json={"name": ".hidden", "prompt": "a"})
    assert bad_name.status_code == 400 and "name" in bad_name.json()["error"]["message"]
    assert post(limited.url, "/v1/states/nothing-here/load").status_code == 404


@needs_openai
def test_the_api_key_is_required_except_for_health(limited):
    assert httpx.get(limited.url + "/health", timeout=WAIT).status_code == 200
    assert httpx.get(limited.url + "/v1/models", timeout=WAIT).status_code == 401
    wrong = httpx.get(limited.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=WAIT)
    assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
    assert httpx.get(limited.url + "/metrics", timeout=WAIT).status_code == 401
    client = openai.OpenAI(base_url=limited.url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)
    assert client.models.list().data[0].id == "tiny"


def test_a_full_queue_answers_429():
    engine = Engine(tiny_model("x"), EngineConfig(num_slots=1, max_queue=1))  # never started: nothing drains
    server = Server(create_app(engine, TOKENIZER, model_name="tiny"))
    try:
        engine.submit([1], SamplingParams(max_tokens=1), lambda event: None)
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, timeout=WAIT)
        assert response.status_code == 429 and "queue is full" in response.json()["error"]["message"]
    finally:
        server.close()


def test_a_request_past_its_timeout_gets_504_and_frees_its_slot(limited):
    start = time.monotonic()
    response = post(limited.url, "/v1/completions", json={"prompt": "a", "max_tokens": 100_000, "temperature": 0})
    assert response.status_code == 504 and "timed out after 2 s" in response.json()["error"]["message"]
    assert time.monotonic() - start < WAIT
    wait_until(lambda: limited.engine.stats()["active_slots"] == 0, "the slot to be freed")


def test_a_client_that_disconnects_frees_its_slot(limited):
    engine = limited.engine
    cancelled = engine.metrics["requests_cancelled"]
    # greedy: a sampled end-of-text token would finish the request before the client leaves
    body = {"prompt": "a", "max_tokens": 100_000, "stream": True, "temperature": 0}
    with httpx.stream("POST", limited.url + "/v1/completions", json=body, headers=AUTH, timeout=WAIT) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped line iterator closes the connection (docs/serve.md)
        events = [next(lines) for _ in range(20)][::2]  # 10 "data: ..." lines, each followed by a blank one
        assert all(e.startswith("data: {") for e in events), events
        assert engine.stats()["active_slots"] == 1, "the server ended the stream of a client still connected"
    wait_until(lambda: engine.metrics["requests_cancelled"] > cancelled, "the stream's request to be cancelled")
    wait_until(lambda: engine.stats()["active_slots"] == 0, "the slot to be freed")
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up frees its slot too
        post(limited.url, "/v1/completions", timeout=0.5, json={"prompt": "a", "max_tokens": 100_000, "temperature": 0})
    wait_until(lambda: engine.metrics["requests_cancelled"] > cancelled + 1, "the request to be cancelled")
    wait_until(lambda: engine.stats()["active_slots"] == 0, "the slot to be freed")


def test_a_failing_step_fails_its_request_and_the_server_keeps_serving(limited, monkeypatch):
    model = limited.engine.model

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(model, "forward", broken)
    failed = post(limited.url, "/v1/completions", json={"prompt": "ab", "max_tokens": 3})
    assert failed.status_code == 500 and "simulated device failure" in failed.json()["error"]["message"]
    monkeypatch.undo()
    ok = post(limited.url, "/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(limited.url + "/health", timeout=WAIT).json() == {"status": "ok"}


def test_metrics_are_prometheus_text(served):
    text = httpx.get(served.url + "/metrics", timeout=WAIT).text
    for name in ("revival_queue_depth", "revival_active_slots", "revival_state_pool_bytes", "revival_snapshot_bytes",
                 "revival_tokens_per_second", "revival_generated_tokens_total", 'path="/v1/completions",status="200"'):
        assert name in text
    pool = [line for line in text.splitlines() if line.startswith("revival_state_pool_bytes ")]
    assert int(pool[0].split()[1]) == served.engine.pool.nbytes() > 0


def test_revival_serve_command_loads_a_checkpoint_directory(tmp_path):
    from revival.cli import build_parser
    from revival.serve.cli import build_server

    model = tiny_model("x")
    model.save_pretrained(tmp_path / "model")
    TOKENIZER.save(tmp_path / "model")
    args = build_parser().parse_args(["serve", str(tmp_path / "model"), "--num-slots", "2", "--max-tokens", "8",
                                      "--device", "cpu"])
    engine, app = build_server(args)
    server = Server(app)
    try:
        assert httpx.get(server.url + "/v1/models", timeout=WAIT).json()["data"][0]["id"] == "model"
        body = {"prompt": "hi", "max_tokens": 5, "temperature": 0}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=WAIT).json()
        params = SamplingParams(max_tokens=5, temperature=0.0, stop_tokens=(EOS,))
        assert answer["choices"][0]["text"] == text_of(reference(engine.model, TOKENIZER.encode("hi"), params))
    finally:
        server.close()
        engine.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_matches_generate():
    model = tiny_model("xa", d_model=64, chunk_size=16).float().cuda()  # head dims the Triton kernels take
    engine = Engine(model, EngineConfig(num_slots=8, max_prompt_tokens=64, max_tokens=32, prefill_chunk=5)).start()
    try:
        assert engine.uses_cuda_graphs, engine.graph_error
        requests = mixed_requests(24, seed=3)
        results = [[] for _ in requests]
        finished = threading.Semaphore(0)
        for i, (prompt, params) in enumerate(requests):
            engine.submit(prompt, params, lambda event, i=i: results[i].append(event.id) if isinstance(
                event, Token) else finished.release())
        for _ in requests:
            assert finished.acquire(timeout=WAIT)
        for i, (prompt, params) in enumerate(requests):
            assert results[i] == reference(model, prompt, params), f"request {i}"
    finally:
        engine.stop()
