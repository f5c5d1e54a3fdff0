"""A fixed pool of per-request state slots for continuous batching, over any `LanguageModel` state.

A model state (see revival/models/model.py) is a list with one entry per block; each entry is a nested tuple of
tensors whose dim 0 is the batch (recurrent layers: constant size), except attention blocks, whose entry is a KV cache
(k, v) of shape (B, Hkv, T_so_far, hd) that grows with T. The pool keeps one row per slot:

    recurrent tensors   (num_slots, ...)  copied row by row in and out
    attention caches    a `SlotKVCache` per block: k, v (num_slots, Hkv, max_len, hd) and lengths (num_slots,)

`view(n)` is the model state of rows [0, n) (views into the pool, so a decode step over the first n slots reads the
pool in place); `update(n, new_state)` copies a step's new recurrent tensors back (attention caches write in place).
Rows move with `move(src, dst)` so that active slots stay packed at the front (a decode step runs on a prefix).
"""

from __future__ import annotations

import torch

from ..ops.attention import apply_rope, rope_cos_sin

__all__ = ["SlotKVCache", "SlotPool", "map_tensors", "flatten_state", "unflatten_state"]


def map_tensors(fn, tree):
    """Apply fn to every tensor of a nested list/tuple (None kept), preserving the structure."""
    if tree is None:
        return None
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_tensors(fn, item) for item in tree)
    raise ValueError(f"state: expected tensors in nested lists/tuples, got {type(tree).__name__}")


def flatten_state(tree, prefix: str = "state") -> tuple[dict[str, torch.Tensor], object]:
    """-> ({dotted name: tensor}, skeleton) where skeleton is the JSON-able structure (lists, "T" leaves, None)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, name):
        if node is None:
            return None
        if isinstance(node, torch.Tensor):
            tensors[name] = node
            return "T"
        if isinstance(node, (list, tuple)):
            return [walk(item, f"{name}.{i}") for i, item in enumerate(node)]
        raise ValueError(f"state: expected tensors in nested lists/tuples, got {type(node).__name__}")

    return tensors, walk(tree, prefix)


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton, prefix: str = "state"):
    """Inverse of `flatten_state`: the top level is a list (one entry per block), inner levels are tuples."""

    def build(node, name, depth):
        if node is None:
            return None
        if node == "T":
            if name not in tensors:
                raise ValueError(f"state: tensor {name!r} missing from the saved state")
            return tensors[name]
        if not isinstance(node, list):
            raise ValueError(f"state: malformed structure at {name!r}")
        items = [build(item, f"{name}.{i}", depth + 1) for i, item in enumerate(node)]
        return items if depth == 0 else tuple(items)

    return build(skeleton, prefix, 0)


class SlotKVCache:
    """KV cache with a fixed capacity and one length per row: the attention state of a slot pool.

    k, v: (B, Hkv, max_len, hd) with keys after RoPE; lengths: (B,) long, the number of valid positions per row.
    `Attention.forward` hands its projected q, k, v (before RoPE) to `attend`, which rotates them at each row's own
    positions, writes the new keys/values in place at [lengths, lengths + T) and attends over the valid positions.
    Shapes never change, so a decode step over this cache can be captured in a CUDA graph.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        if k.shape != v.shape or k.ndim != 4 or lengths.shape != (k.shape[0],):
            raise ValueError(f"SlotKVCache: expected k, v (B, Hkv, max_len, hd) and lengths (B,), got "
                             f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(lengths.shape)}")
        self.k, self.v, self.lengths = k, v, lengths

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def rows(self, n: int) -> SlotKVCache:
        """The cache of rows [0, n) (views: writes go to this cache)."""
        return SlotKVCache(self.k[:n], self.v[:n], self.lengths[:n])

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope_theta: float) -> torch.Tensor:
        """q (B, Hq, T, hd), k, v (B, Hkv, T, hd) before RoPE -> attention output (B, Hq, T, hd); appends k, v."""
        B, Hq, T, hd = q.shape
        Hkv = k.shape[1]
        positions = self.lengths[:, None] + torch.arange(T, device=q.device)  # (B, T)
        rope_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        cos, sin = rope_cos_sin(positions.reshape(-1), hd, rope_theta, rope_dtype)
        cos, sin = cos.view(B, 1, T, hd), sin.view(B, 1, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # idle rows keep stepping; clamping keeps their writes inside the buffer (their output is never read)
        index = positions.clamp(max=self.max_len - 1)[:, None, :, None].expand(B, Hkv, T, hd)
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        self.lengths.add_(T)
        key_positions = torch.arange(self.max_len, device=q.device)
        mask = key_positions[None, None, :] <= positions[:, :, None]  # (B, T, max_len): causal within each row
        keys, values = self.k.to(q.dtype), self.v.to(q.dtype)
        if Hkv != Hq:
            keys = keys.repeat_interleave(Hq // Hkv, dim=1)
            values = values.repeat_interleave(Hq // Hkv, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])


def _is_attention(block) -> bool:
    from ..layers.attention import Attention

    return isinstance(block.mixer, Attention)


class SlotPool:
    """`num_slots` rows of model state (see the module docstring); attention caches hold `max_len` positions."""

    def __init__(self, model, num_slots: int, max_len: int):
        if num_slots < 1:
            raise ValueError(f"num_slots: expected an integer >= 1, got {num_slots}")
        if max_len < 1:
            raise ValueError(f"max_len: expected an integer >= 1, got {max_len}")
        self.num_slots, self.max_len = num_slots, max_len
        self.attention_blocks = [_is_attention(block) for block in model.blocks]
        with torch.no_grad():  # the structure of one row, from a one-token forward
            _, example = model(torch.zeros(1, 1, dtype=torch.long, device=model.device))
        self.state: list = []
        for is_attention, entry in zip(self.attention_blocks, example):
            if is_attention:
                k, _ = entry
                shape = (num_slots, k.shape[1], max_len, k.shape[3])
                self.state.append(SlotKVCache(k.new_zeros(shape), k.new_zeros(shape),
                                              torch.zeros(num_slots, dtype=torch.long, device=k.device)))
            else:
                self.state.append(map_tensors(lambda t: t.new_zeros((num_slots, *t.shape[1:])), entry))

    def view(self, n: int) -> list:
        """The model state of rows [0, n): views into the pool."""
        return [entry.rows(n) if is_attention else map_tensors(lambda t: t[:n], entry)
                for is_attention, entry in zip(self.attention_blocks, self.state)]

    def update(self, n: int, new_state: list) -> None:
        """Copy a forward's new recurrent state (batch n) into rows [0, n); attention caches were written in place."""
        for is_attention, entry, new in zip(self.attention_blocks, self.state, new_state):
            if not is_attention:
                _copy_tree(map_tensors(lambda t: t[:n], entry), new)

    def write(self, slot: int, state: list) -> None:
        """Store a batch-1 model state (attention entries as (k, v) tuples of any length <= max_len) in a row."""
        for is_attention, entry, new in zip(self.attention_blocks, self.state, state):
            if is_attention:
                k, v = new
                length = k.shape[2]
                if length > self.max_len:
                    raise ValueError(f"state: attention cache of {length} positions exceeds max_len {self.max_len}")
                entry.k[slot, :, :length] = k[0]
                entry.v[slot, :, :length] = v[0]
                entry.k[slot, :, length:].zero_()  # masked out, but stale values could be non-finite
                entry.v[slot, :, length:].zero_()
                entry.lengths[slot] = length
            else:
                _copy_tree(map_tensors(lambda t: t[slot:slot + 1], entry), new)

    def read(self, slot: int) -> list:
        """A copy of one row as a batch-1 model state (attention caches trimmed to the row's length)."""
        state = []
        for is_attention, entry in zip(self.attention_blocks, self.state):
            if is_attention:
                length = int(entry.lengths[slot])
                state.append((entry.k[slot:slot + 1, :, :length].clone(), entry.v[slot:slot + 1, :, :length].clone()))
            else:
                state.append(map_tensors(lambda t: t[slot:slot + 1].clone(), entry))
        return state

    def move(self, src: int, dst: int) -> None:
        """Copy row src into row dst (used to keep the active rows packed)."""
        if src == dst:
            return
        for is_attention, entry in zip(self.attention_blocks, self.state):
            tensors = (entry.k, entry.v, entry.lengths) if is_attention else flatten_state(entry)[0].values()
            for t in tensors:
                t[dst] = t[src]

    def nbytes(self) -> int:
        total = 0
        for is_attention, entry in zip(self.attention_blocks, self.state):
            tensors = (entry.k, entry.v) if is_attention else flatten_state(entry)[0].values()
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def _copy_tree(dst, src) -> None:
    if dst is None:
        return
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
        return
    for d, s in zip(dst, src):
        _copy_tree(d, s)
