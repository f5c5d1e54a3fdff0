"""Corpora: documents as bytes, split into train/validation/test by whole document.

A :class:`Corpus` holds three lists of documents (``bytes``), the documents' names (relative paths) and a content hash.

Split rule (contract; deterministic across machines): a document named ``name`` gets the key
``k = int.from_bytes(sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64`` in ``[0, 1)``;
``k < validation_fraction`` -> validation, ``k < validation_fraction + test_fraction`` -> test, else train.
If validation (test) comes out empty, the train document with the smallest (largest) key moves there, so every split
has at least one document. Corpora of fewer than 3 documents are instead split by lines inside each document: the
first lines train, the next validation, the last test (see :func:`split_by_lines`).

Content hash (contract): sha256 over the documents sorted by name; for each, ``name`` (UTF-8) + ``b"\\0"`` +
``len(data)`` as 8 bytes little-endian + ``data``. It is independent of the split.

The embedded default ``"stdlib"`` is the Python standard library's ``.py`` files (see :func:`stdlib_corpus`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MissingPathError, UserError

SPLITS = ("train", "validation", "test")

# stdlib walk: folders never entered and file-name prefixes never read (machine-specific build files).
STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
STDLIB_SKIPPED_FILE_PREFIXES = ("_sysconfigdata",)


@dataclass(frozen=True)
class Corpus:
    """Documents split by whole document.

    ``train``/``validation``/``test``: lists of documents (raw bytes, usually UTF-8 text).
    ``names``: split -> the documents' names (relative paths), in the same order as the documents.
    ``content_hash``: sha256 hex digest over all documents (module docstring); record it with every run.
    """

    name: str
    train: list[bytes]
    validation: list[bytes]
    test: list[bytes]
    content_hash: str
    names: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def split(self, split: str) -> list[bytes]:
        """The documents of ``split`` (one of ``"train"``, ``"validation"``, ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: expected one of {SPLITS}")
        return getattr(self, split)

    def num_bytes(self, split: str) -> int:
        return sum(len(document) for document in self.split(split))

    def describe(self) -> dict:
        """A small JSON-able summary (name, hash, documents and bytes per split) to log with a run."""
        summary = {"name": self.name, "source": self.source, "content_hash": self.content_hash}
        for split in SPLITS:
            summary[f"{split}_documents"] = len(self.split(split))
            summary[f"{split}_bytes"] = self.num_bytes(split)
        return summary


def content_hash(named_documents: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over the documents sorted by name (format in the module docstring)."""
    digest = hashlib.sha256()
    for name, data in sorted(named_documents, key=lambda item: item[0]):
        digest.update(name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def split_key(name: str) -> float:
    """The document's position in ``[0, 1)`` used by the split rule."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for argument, value in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{argument}={value}: expected a fraction in [0, 1)")
    if validation_fraction + test_fraction >= 1.0:
        raise UserError(
            f"validation_fraction + test_fraction = {validation_fraction + test_fraction}: expected less than 1"
        )


def split_by_lines(
    name: str, data: bytes, validation_fraction: float, test_fraction: float
) -> dict[str, list[tuple[str, bytes]]]:
    """Split one document into contiguous line ranges: first lines train, next validation, last test.

    Each part gets at least one line (``round(n_lines * fraction)``, at least 1); needs at least 3 lines.
    Parts are named ``name#train``, ``name#validation``, ``name#test``.
    """
    lines = data.splitlines(keepends=True)
    if len(lines) < 3:
        raise UserError(
            f"corpus document {name!r} has {len(lines)} line(s): splitting a corpus of fewer than 3 documents by "
            "lines needs at least 3 lines; give more text or more files"
        )
    num_test = max(1, round(len(lines) * test_fraction))
    num_validation = max(1, round(len(lines) * validation_fraction))
    num_train = len(lines) - num_test - num_validation
    if num_train < 1:
        num_train, num_validation, num_test = len(lines) - 2, 1, 1
    bounds = {"train": (0, num_train), "validation": (num_train, num_train + num_validation)}
    bounds["test"] = (num_train + num_validation, len(lines))
    return {split: [(f"{name}#{split}", b"".join(lines[start:stop]))] for split, (start, stop) in bounds.items()}


def split_documents(
    named_documents: list[tuple[str, bytes]], validation_fraction: float = 0.01, test_fraction: float = 0.01
) -> dict[str, list[tuple[str, bytes]]]:
    """Apply the split rule (module docstring). Returns split -> [(name, data)] sorted by name. Names must be unique."""
    _check_fractions(validation_fraction, test_fraction)
    names = [name for name, _ in named_documents]
    if len(set(names)) != len(names):
        raise ValueError("named_documents: document names must be unique")
    if len(named_documents) < 3:
        parts: dict[str, list[tuple[str, bytes]]] = {split: [] for split in SPLITS}
        for name, data in named_documents:
            for split, pieces in split_by_lines(name, data, validation_fraction, test_fraction).items():
                parts[split].extend(pieces)
        return parts
    keyed = sorted(((split_key(name), name, data) for name, data in named_documents), key=lambda item: item[0])
    splits: dict[str, list[tuple[float, str, bytes]]] = {split: [] for split in SPLITS}
    for key, name, data in keyed:
        if key < validation_fraction:
            splits["validation"].append((key, name, data))
        elif key < validation_fraction + test_fraction:
            splits["test"].append((key, name, data))
        else:
            splits["train"].append((key, name, data))
    if not splits["validation"]:
        splits["validation"].append(splits["train"].pop(0))
    if not splits["test"]:
        splits["test"].append(splits["train"].pop(-1))
    return {split: sorted(((n, d) for _, n, d in items), key=lambda item: item[0]) for split, items in splits.items()}


def make_corpus(
    name: str,
    named_documents: list[tuple[str, bytes]],
    validation_fraction: float = 0.01,
    test_fraction: float = 0.01,
    source: str = "",
) -> Corpus:
    """Build a :class:`Corpus` from ``[(name, data)]``: drop empty documents, split, hash."""
    named_documents = [(doc_name, data) for doc_name, data in named_documents if data]
    if not named_documents:
        raise UserError(f"corpus {name!r} ({source or 'no source'}): no non-empty documents; expected some text")
    return corpus_from_splits(name, split_documents(named_documents, validation_fraction, test_fraction), source)


def corpus_from_splits(name: str, splits: dict[str, list[tuple[str, bytes]]], source: str = "") -> Corpus:
    """A :class:`Corpus` from split -> [(name, data)] (hash over all documents of all splits)."""
    every_document = [item for split in SPLITS for item in splits[split]]
    return Corpus(
        name=name,
        train=[data for _, data in splits["train"]],
        validation=[data for _, data in splits["validation"]],
        test=[data for _, data in splits["test"]],
        content_hash=content_hash(every_document),
        names={split: [doc_name for doc_name, _ in splits[split]] for split in SPLITS},
        source=source,
    )


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(include_tests: bool = True, root: str | os.PathLike | None = None) -> Corpus:
    """The embedded default: every ``.py`` file of the Python standard library, read as bytes.

    Skipped: ``site-packages``/``dist-packages``, ``__pycache__``, ``config-*`` build folders and ``_sysconfigdata*``
    files (both machine-specific). ``include_tests=True`` (the ``"stdlib"`` corpus) keeps the standard library's own
    test folders (``test``, ``tests``, ``idle_test``): about 1,800 files and 31 MB on CPython 3.11 (some of them not
    UTF-8); ``False`` (``"stdlib-notests"``) leaves them out: about 730 files, 12 MB. Split 1% / 1% by the rule above.
    Linux distributions that ship the tests separately (Debian) give different content: the hash tells.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise MissingPathError(f"standard library folder {root} not found: expected sysconfig's 'stdlib' path")
    skipped_dirs = STDLIB_SKIPPED_DIRS if include_tests else STDLIB_SKIPPED_DIRS | STDLIB_TEST_DIRS
    named_documents = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skipped_dirs and not d.startswith("config-"))
        for file_name in sorted(files):
            if file_name.endswith(".py") and not file_name.startswith(STDLIB_SKIPPED_FILE_PREFIXES):
                path = Path(folder) / file_name
                named_documents.append((path.relative_to(root).as_posix(), _read_bytes(path)))
    name = "stdlib" if include_tests else "stdlib-notests"
    return make_corpus(name, named_documents, 0.01, 0.01, source=f"python stdlib .py files under {root}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise UserError(f"corpus file {path} could not be read ({error}); expected a readable text file") from error


def _looks_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


def read_text_file(path: Path) -> list[tuple[str, bytes]]:
    """The file as one document; a file with NUL bytes (a binary file) is refused."""
    data = _read_bytes(path)
    if _looks_binary(data):
        raise UserError(f"corpus {path}: it has NUL bytes, so it is not a text file; expected a text file, a folder "
                        "of text files or a .jsonl file")
    return [(path.name, data)]


def read_text_directory(path: Path) -> list[tuple[str, bytes]]:
    """Every regular file under ``path`` (recursive), hidden files/folders skipped; files with NUL bytes skipped."""
    named_documents = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for file_name in sorted(files):
            if file_name.startswith("."):
                continue
            file_path = Path(folder) / file_name
            data = _read_bytes(file_path)
            if _looks_binary(data):
                warnings.warn(f"skipping {file_path}: it has NUL bytes, so it is not a text file", stacklevel=3)
                continue
            named_documents.append((file_path.relative_to(path).as_posix(), data))
    return named_documents


def read_jsonl(path: Path, text_field: str = "text") -> list[tuple[str, bytes]]:
    """One document per JSON line, taken from ``text_field``; named ``line-<number>`` (1-based). Blank lines skipped."""
    named_documents = []
    for number, line in enumerate(_read_bytes(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"{path} line {number}: not valid JSON ({error}); expected one JSON object a line"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path} line {number}: expected a JSON object with a string field {text_field!r}")
        named_documents.append((f"line-{number:09d}", record[text_field].encode("utf-8")))
    return named_documents


def user_corpus(
    path: str | os.PathLike,
    validation_fraction: float = 0.01,
    test_fraction: float = 0.01,
    text_field: str = "text",
) -> Corpus:
    """A corpus from a text file, a directory of text files (recursive) or a ``.jsonl`` file with a ``text`` field.

    A single text file (or any corpus of fewer than 3 documents) is split by lines: see :func:`split_by_lines`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingPathError(f"corpus path {path} does not exist: expected a text file, a folder or a .jsonl file")
    if path.is_dir():
        named_documents, kind = read_text_directory(path), "directory of text files"
    elif path.suffix.lower() == ".jsonl":
        named_documents, kind = read_jsonl(path, text_field), f"JSONL file, field {text_field!r}"
    else:
        named_documents, kind = read_text_file(path), "text file"
    if not any(data for _, data in named_documents):
        raise UserError(f"corpus {path} ({kind}) is empty: expected some text")
    return make_corpus(path.name, named_documents, validation_fraction, test_fraction, source=f"{kind} {path}")
