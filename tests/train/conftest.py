"""Shared fixtures for the trainer tests: a tiny in-memory corpus and tiny run configs (seconds on 2 CPU cores)."""

from __future__ import annotations

import pytest

from revival.data import make_corpus
from revival.train.config import RunConfig

TINY_MODEL = {"preset": "llama", "d_model": 32, "num_blocks": 2, "num_heads": 2}  # cheapest per step on CPU
RECURRENT_MODEL = {"preset": "xlstm[1:1]", "d_model": 32, "num_blocks": 2, "num_heads": 2, "chunk_size": 8}  # "ms"


def tiny_documents(count: int = 12) -> list[tuple[str, bytes]]:
    """Short, repetitive Python-like documents (a byte-level model learns them in a few steps)."""
    docs = []
    for i in range(count):
        body = "".join(f"def f{j}(x):\n    return x + {j}\n\n" for j in range(i % 3, i % 3 + 4))
        docs.append((f"doc{i:02d}.py", body.encode()))
    return docs


@pytest.fixture(scope="session")
def tiny_corpus():
    return make_corpus("tiny", tiny_documents(), validation_fraction=0.2, test_fraction=0.1)


def tiny_run(out_dir, model=None, **train) -> RunConfig:
    """A RunConfig for a tiny model; `train` overrides TrainConfig fields."""
    settings = dict(steps=4, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=1000, eval_docs=2,
                    eval_max_tokens=512, checkpoint_every=1000, log_every=1, device="cpu", tensorboard=False,
                    progress=False, out_dir=str(out_dir))
    settings.update(train)
    return RunConfig.from_dict({"model": dict(model or TINY_MODEL),
                                "data": {"corpus": "tiny", "tokenizer": "byte", "context_length": 16},
                                "train": settings})
