"""`revival serve`: an OpenAI-compatible server with continuous batching over recurrent state slots (docs/serve.md).

    Engine(model, EngineConfig(...)).start()      the batching loop on its own thread (revival/serve/engine.py)
    create_app(engine, tokenizer, ...)            the FastAPI app (revival/serve/app.py; needs the `serve` extra)
"""

from .engine import Engine, EngineConfig, EngineError, SamplingParams
from .slots import SlotKVCache, SlotPool
from .snapshots import Snapshot, SnapshotCache

__all__ = ["Engine", "EngineConfig", "EngineError", "SamplingParams", "SlotKVCache", "SlotPool", "Snapshot",
           "SnapshotCache"]
