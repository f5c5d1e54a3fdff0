"""Tokenizers: byte-level (no training) and byte-level BPE (Hugging Face ``tokenizers``), one small interface.

Interface (contract): ``encode(text: str | bytes) -> list[int]``, ``encode_batch(texts) -> list[list[int]]``,
``decode(ids) -> str``, ``vocab_size``, ``eos_id`` (``<|endoftext|>``, the document separator), ``kind``,
``save(directory)``, and ``load_tokenizer(directory)`` which detects the saved kind.

Documents become text by one rule, :func:`as_text`: bytes are decoded as UTF-8 with invalid bytes replaced by U+FFFD.
Both tokenizers encode that text, and :func:`count_utf8_bytes` counts its UTF-8 bytes, so bits per byte is
``sum(nll_nats) / (ln 2 * count_utf8_bytes(documents))`` for either tokenizer.

Files: the byte tokenizer saves ``revival_tokenizer.json`` (``{"kind": "byte", ...}``); a BPE / Hugging Face tokenizer
saves ``tokenizer.json`` (loadable by ``transformers``) plus ``revival_tokenizer.json`` naming its EOS token. A folder
holding only a ``tokenizer.json`` (a Hub checkpoint) loads too: EOS comes from ``tokenizer_config.json`` or from a
known special token.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerObject
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..errors import MissingPathError, UserError

EOS_TOKEN = "<|endoftext|>"
META_FILE = "revival_tokenizer.json"
HF_FILE = "tokenizer.json"
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


def as_text(document: str | bytes) -> str:
    """The text of a document: ``str`` as is, ``bytes`` decoded as UTF-8 with invalid bytes replaced (U+FFFD)."""
    if isinstance(document, str):
        return document
    if isinstance(document, bytes | bytearray | memoryview):
        return bytes(document).decode("utf-8", errors="replace")
    raise ValueError(f"document of type {type(document).__name__}: expected str or bytes")


def count_utf8_bytes(documents: Iterable[str | bytes]) -> int:
    """Total UTF-8 bytes of the documents' text (:func:`as_text`): the denominator of bits per byte."""
    total = 0
    for document in documents:
        if isinstance(document, bytes):
            try:
                document.decode("utf-8")
                total += len(document)
                continue
            except UnicodeDecodeError:
                pass
        total += len(as_text(document).encode("utf-8"))
    return total


class Tokenizer(Protocol):
    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str | bytes) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, ``<|endoftext|>`` = 256; ``vocab_size`` = 257 (not padded).

    ``encode`` of a string that contains the text ``<|endoftext|>`` gives its bytes, never the special id.
    ``decode`` renders id 256 as ``<|endoftext|>`` and invalid UTF-8 byte runs as U+FFFD.
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str | bytes) -> list[int]:
        return list(self.encode_bytes(text))

    def encode_bytes(self, text: str | bytes) -> bytes:
        """The ids as a ``bytes`` object (fast path for packing; no special ids)."""
        if isinstance(text, bytes):
            try:
                text.decode("utf-8")
                return text
            except UnicodeDecodeError:
                pass
        return as_text(text).encode("utf-8")

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        pieces, run = [], bytearray()
        for token in ids:
            token = int(token)
            if 0 <= token < 256:
                run.append(token)
            elif token == self.eos_id:
                pieces.append(run.decode("utf-8", errors="replace") + EOS_TOKEN)
                run = bytearray()
            else:
                raise ValueError(f"token id {token}: expected an id in [0, {self.vocab_size})")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def save(self, directory: str | os.PathLike) -> None:
        meta = {"kind": "byte", "vocab_size": self.vocab_size, "special_tokens": {EOS_TOKEN: self.eos_id}}
        _write_atomically(Path(directory) / META_FILE, json.dumps(meta, indent=1) + "\n")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_id=256)"


class HFTokenizer:
    """Any Hugging Face ``tokenizers.Tokenizer`` (our trained byte-level BPE, or a Hub ``tokenizer.json``).

    ``decode`` keeps special tokens (so EOS shows as ``<|endoftext|>``). Note: the Hugging Face library turns the text
    ``<|endoftext|>`` inside an input into the special id.
    """

    kind = "hf"

    def __init__(self, tokenizer: HFTokenizerObject, eos_token: str = EOS_TOKEN):
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos_token={eos_token!r}: not in the tokenizer's vocabulary")
        self.tokenizer = tokenizer
        self.eos_token = eos_token
        self._eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str | bytes) -> list[int]:
        return self.tokenizer.encode(as_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking: ~15% faster, same ids.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode([as_text(text) for text in texts], add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(token) for token in ids], skip_special_tokens=False)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        _write_atomically(directory / HF_FILE, self.tokenizer.to_str())
        meta = {"kind": "hf", "vocab_size": self.vocab_size, "eos_token": self.eos_token, "eos_id": self.eos_id}
        _write_atomically(directory / META_FILE, json.dumps(meta, indent=1) + "\n")

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_token={self.eos_token!r}, eos_id={self.eos_id})"


def train_bpe(
    documents: Iterable[str | bytes],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style pre-tokenizer, no prefix space) on the documents (use the train split).

    ``vocab_size`` counts the 256 byte symbols, the merges and ``<|endoftext|>`` (id 0); at least 257.
    ``max_bytes``: train on the first documents only, until this many bytes (deterministic; faster on big corpora).
    """
    if vocab_size < 257:
        raise UserError(f"vocab_size={vocab_size}: expected at least 257 (256 bytes + <|endoftext|>)")
    texts, total = [], 0
    for document in documents:
        if max_bytes is not None and total >= max_bytes:
            break
        texts.append(as_text(document))
        total += len(document)
    if not any(texts):
        raise UserError("documents: expected at least one non-empty document to train the BPE on")
    tokenizer = HFTokenizerObject(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return HFTokenizer(tokenizer, EOS_TOKEN)


def _eos_from_tokenizer_config(directory: Path) -> str | None:
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    eos = json.loads(config_path.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def load_tokenizer(directory: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """Load the tokenizer saved in ``directory`` (kind detected from the files; see the module docstring)."""
    directory = Path(directory)
    meta_path, hf_path = directory / META_FILE, directory / HF_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{meta_path}: not valid JSON ({error}); the file is corrupt") from None
    if meta.get("kind") == "byte":
        return ByteTokenizer()
    if not hf_path.is_file():
        raise MissingPathError(
            f"no tokenizer in {directory}: expected {META_FILE} (byte-level) or {HF_FILE}; save one with "
            "model.save_pretrained(directory, tokenizer=tokenizer) or tokenizer.save(directory)")
    try:
        tokenizer = HFTokenizerObject.from_file(str(hf_path))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        raise UserError(f"{hf_path}: unreadable ({error}); the file is corrupt") from None
    eos_token = meta.get("eos_token") or _eos_from_tokenizer_config(directory)
    if eos_token is None:
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        eos_token = next((token for token in KNOWN_EOS_TOKENS if token in vocab), None)
    if eos_token is None:
        raise UserError(f"{hf_path}: no end-of-text token found; expected one of {KNOWN_EOS_TOKENS}")
    return HFTokenizer(tokenizer, eos_token)


def make_tokenizer(
    kind: str, documents: Iterable[str | bytes] | None = None, vocab_size: int = 4096, **bpe_options
) -> ByteTokenizer | HFTokenizer:
    """``kind="byte"`` -> :class:`ByteTokenizer`; ``kind="bpe"`` -> :func:`train_bpe` on ``documents``."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if documents is None:
            raise ValueError("documents=None: a BPE tokenizer needs training documents (the train split)")
        return train_bpe(documents, vocab_size, **bpe_options)
    raise UserError(f"tokenizer kind={kind!r}: expected 'byte' or 'bpe'")
