"""Packing documents into fixed-length training sequences, and whole-document iteration for validation.

Token stream (contract): every document is preceded by the separator ``eos``::

    stream = [eos] + doc_0 + [eos] + doc_1 + ... + [eos] + doc_{n-1} + [eos]

so ``eos`` both ends a document (it is the target after its last token) and starts the next (from it the model
predicts the first token). ``doc_start[t]`` is True where ``stream[t]`` is a separator that begins a document: a
model that resets its state at document boundaries resets *before* reading input position ``t``.

Sequences: sequence ``s`` (``0 <= s < num_sequences``) is ``stream[s*L : s*L + L + 1]`` with ``L = context_length``:
``input_ids = window[:-1]``, ``targets = window[1:]``, ``doc_start = doc_start[s*L : s*L + L]``
(``num_sequences = (len(stream) - 1) // L``; the tail that does not fill a sequence is dropped).

Order and resume (contract): training reads an endless list of sequences, epoch after epoch; ``position`` counts
sequences read so far. Position ``p`` is sequence ``perm_e[p % num_sequences]`` of epoch ``e = p // num_sequences``,
where ``perm_e = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed + e))`` (identity when
``shuffle=False``). ``batch(p, B)`` holds positions ``p .. p+B-1``; the trainer saves ``p`` and restores it to resume
bit-identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import UserError
from .tokenizers import ByteTokenizer, Tokenizer

ENCODE_CHUNK = 64  # documents per encode_batch call (progress granularity)


@dataclass(frozen=True)
class Batch:
    """``input_ids``, ``targets``: (B, L) int64; ``doc_start``: (B, L) bool (True: a document starts at this input)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    doc_start: torch.Tensor


def _encode_documents(
    documents: Sequence[str | bytes], tokenizer: Tokenizer, show_progress: bool
) -> Iterator[np.ndarray]:
    """Yield each document's ids as an int32 array, in order."""
    if isinstance(tokenizer, ByteTokenizer):
        for document in tqdm(documents, desc="tokenizing", disable=not show_progress):
            yield np.frombuffer(tokenizer.encode_bytes(document), dtype=np.uint8).astype(np.int32)
        return
    with tqdm(total=len(documents), desc="tokenizing", disable=not show_progress) as progress:
        for start in range(0, len(documents), ENCODE_CHUNK):
            chunk = documents[start : start + ENCODE_CHUNK]
            for ids in tokenizer.encode_batch(chunk):
                yield np.asarray(ids, dtype=np.int32)
            progress.update(len(chunk))


def pack_documents(
    documents: Sequence[str | bytes], tokenizer: Tokenizer, show_progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize and concatenate with separators (module docstring).

    Returns ``stream``: (N,) int32 token ids and ``doc_start``: (N,) bool, ``N = sum(len(doc)) + len(documents) + 1``.
    """
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces, starts, offset = [], [], 0
    for ids in _encode_documents(documents, tokenizer, show_progress):
        starts.append(offset)
        pieces.extend((eos, ids))
        offset += 1 + len(ids)
    pieces.append(eos)
    stream = torch.from_numpy(np.concatenate(pieces))
    doc_start = torch.zeros(stream.numel(), dtype=torch.bool)
    doc_start[torch.as_tensor(starts, dtype=torch.long)] = True
    return stream, doc_start


class PackedDataset:
    """Fixed-length training sequences over a packed token stream, shuffled per epoch by seed, resumable by position.

    ``stream``: (N,) integer token ids; ``doc_start``: (N,) bool; ``context_length``: L (>= 1).
    """

    def __init__(
        self,
        stream: torch.Tensor,
        doc_start: torch.Tensor,
        context_length: int,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if context_length < 1:
            raise ValueError(f"context_length={context_length}: expected a positive integer")
        if stream.ndim != 1 or doc_start.shape != stream.shape:
            raise ValueError(
                f"stream {tuple(stream.shape)} and doc_start {tuple(doc_start.shape)}: "
                "expected two 1-D tensors of one length"
            )
        num_sequences = (stream.numel() - 1) // context_length
        if num_sequences < 1:
            raise UserError(
                f"{stream.numel()} tokens and context_length={context_length}: expected at least context_length + 1 "
                "tokens (more data or a shorter context)"
            )
        self.stream = stream
        self.doc_start = doc_start.to(torch.bool)
        self.context_length = context_length
        self.seed = seed
        self.shuffle = shuffle
        self.num_sequences = num_sequences
        self._permutation_epoch: int | None = None
        self._permutation: torch.Tensor | None = None

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[str | bytes],
        tokenizer: Tokenizer,
        context_length: int,
        seed: int = 0,
        shuffle: bool = True,
        show_progress: bool = False,
    ) -> PackedDataset:
        stream, doc_start = pack_documents(documents, tokenizer, show_progress)
        return cls(stream, doc_start, context_length, seed, shuffle)

    @property
    def num_tokens(self) -> int:
        """Training targets per epoch: ``num_sequences * context_length``."""
        return self.num_sequences * self.context_length

    def __len__(self) -> int:
        return self.num_sequences

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unshuffled sequence ``index``: ``(input_ids (L,), targets (L,), doc_start (L,))``, ids int64."""
        if not 0 <= index < self.num_sequences:
            raise ValueError(f"index={index}: expected 0 <= index < {self.num_sequences}")
        start = index * self.context_length
        window = self.stream[start : start + self.context_length + 1].long()
        return window[:-1], window[1:], self.doc_start[start : start + self.context_length]

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The sequence indices of ``epoch`` in reading order: (num_sequences,) int64."""
        if not self.shuffle:
            return torch.arange(self.num_sequences)
        if self._permutation_epoch != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutation = torch.randperm(self.num_sequences, generator=generator)
            self._permutation_epoch = epoch
        return self._permutation

    def sequence_index(self, position: int) -> int:
        """The sequence read at ``position`` (module docstring)."""
        if position < 0:
            raise ValueError(f"position={position}: expected a non-negative integer")
        epoch, offset = divmod(position, self.num_sequences)
        return int(self.epoch_order(epoch)[offset])

    def batch(self, position: int, batch_size: int) -> Batch:
        """Positions ``position .. position + batch_size - 1`` stacked: tensors (batch_size, L).

        The next batch starts at ``position + batch_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        rows = [self.sequence(self.sequence_index(position + row)) for row in range(batch_size)]
        inputs, targets, starts = zip(*rows)
        return Batch(torch.stack(inputs), torch.stack(targets), torch.stack(starts))

    def batches(self, batch_size: int, position: int = 0) -> Iterator[tuple[Batch, int]]:
        """Endless ``(batch, next_position)`` from ``position``; save ``next_position`` to resume after this batch."""
        while True:
            yield self.batch(position, batch_size), position + batch_size
            position += batch_size


def iter_document_tokens(
    documents: Iterable[str | bytes], tokenizer: Tokenizer, append_eos: bool = False
) -> Iterator[torch.Tensor]:
    """Each non-empty document tokenized whole: ``[eos] + doc (+ [eos])`` as a (T,) int64 tensor.

    Evaluate ``tokens[1:]`` from ``tokens[:-1]`` carrying state across segments; the targets are exactly the
    document's tokens (plus the closing ``eos`` if ``append_eos``), so ``count_utf8_bytes(documents)`` is the
    bits-per-byte denominator when ``append_eos`` is False. Empty documents are skipped.
    """
    for document in documents:
        ids = tokenizer.encode(document)
        if not ids:
            continue
        tokens = [tokenizer.eos_id, *ids, *([tokenizer.eos_id] if append_eos else [])]
        yield torch.tensor(tokens, dtype=torch.long)
