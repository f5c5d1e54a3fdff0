"""Prompt-prefix state snapshots: the state after a token prefix, reused by a later request that extends the prefix.

A recurrent model's state after N tokens summarizes all N of them in constant size, so a follow-up request whose
prompt starts with an earlier conversation prefills only its new tokens. Entries are keyed by a hash of the token
prefix (the tokens are kept too and compared, so a hash collision cannot return a wrong state) and evicted least
recently used once their bytes exceed `max_bytes`.

Named states on disk (`/v1/states`) are one safetensors file each: the state tensors under dotted names, `tokens`
(int64) and `logits` (the last position's, to sample the next token without a forward), with metadata naming the
format, the model fingerprint and the state's structure.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..models.model import state_bytes
from .slots import flatten_state, map_tensors, unflatten_state

__all__ = ["Snapshot", "SnapshotCache", "prefix_key", "save_state", "load_state", "STATE_FORMAT"]

STATE_FORMAT = "revival-state-1"


def prefix_key(tokens) -> str:
    """Hash of a token sequence (blake2b of its int64 bytes)."""
    return hashlib.blake2b(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """The batch-1 model state after `tokens`, and the logits (V,) of the last token (predicting the next)."""

    tokens: tuple[int, ...]
    state: list
    logits: torch.Tensor

    @property
    def nbytes(self) -> int:
        return state_bytes(self.state) + self.logits.numel() * self.logits.element_size()


class SnapshotCache:
    """Least-recently-used snapshots by token prefix, at most `max_bytes` in all (0 disables the cache)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected an integer >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Snapshot] = OrderedDict()
        self._lengths: dict[int, int] = {}  # prefix length -> number of entries of that length
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, snapshot: Snapshot) -> None:
        """Store (or refresh) a snapshot; evict the least recently used ones beyond `max_bytes`."""
        if snapshot.nbytes > self.max_bytes or not snapshot.tokens:
            return
        key = prefix_key(snapshot.tokens)
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = snapshot
            self._lengths[len(snapshot.tokens)] = self._lengths.get(len(snapshot.tokens), 0) + 1
            self._bytes += snapshot.nbytes
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> None:
        snapshot = self._entries.pop(key)
        self._bytes -= snapshot.nbytes
        length = len(snapshot.tokens)
        self._lengths[length] -= 1
        if not self._lengths[length]:
            del self._lengths[length]

    def lookup(self, tokens) -> Snapshot | None:
        """The snapshot of the longest stored prefix of `tokens` (the whole of it included), or None."""
        tokens = tuple(tokens)
        with self._lock:
            for length in sorted((n for n in self._lengths if n <= len(tokens)), reverse=True):
                key = prefix_key(tokens[:length])
                snapshot = self._entries.get(key)
                if snapshot is not None and snapshot.tokens == tokens[:length]:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return snapshot
            self.misses += 1
            return None


# ------------------------------------------------------------------------------------------------ named states
def save_state(path: str | os.PathLike, snapshot: Snapshot, model_fingerprint: str) -> int:
    """Write a snapshot to a safetensors file atomically; returns the file's size in bytes."""
    tensors, skeleton = flatten_state(snapshot.state)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    tensors["tokens"] = torch.tensor(snapshot.tokens, dtype=torch.int64)
    tensors["logits"] = snapshot.logits.detach().to("cpu").contiguous()
    metadata = {"format": STATE_FORMAT, "model": model_fingerprint, "skeleton": json.dumps(skeleton)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path.stat().st_size


def load_state(path: str | os.PathLike, model_fingerprint: str, device: torch.device) -> Snapshot:
    """Read a file written by `save_state`; ValueError when it is not one or belongs to another model."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"state file {Path(path).name}: not a readable safetensors file ({error})") from None
    if metadata.get("format") != STATE_FORMAT:
        raise ValueError(f"state file {Path(path).name}: expected format {STATE_FORMAT!r}, "
                         f"got {metadata.get('format')!r}")
    if metadata.get("model") != model_fingerprint:
        raise ValueError(f"state file {Path(path).name}: saved from another model (fingerprint "
                         f"{metadata.get('model')!r}, this server's is {model_fingerprint!r})")
    if "tokens" not in tensors or "logits" not in tensors:
        raise ValueError(f"state file {Path(path).name}: missing 'tokens' or 'logits'")
    tokens = tuple(int(t) for t in tensors.pop("tokens").tolist())
    logits = tensors.pop("logits").to(device)
    state = map_tensors(lambda t: t.to(device), unflatten_state(tensors, json.loads(metadata["skeleton"])))
    return Snapshot(tokens=tokens, state=state, logits=logits)
