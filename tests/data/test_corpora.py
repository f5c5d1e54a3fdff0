"""Corpora: split rule, content hash, the embedded stdlib corpus, user data in three forms, errors."""

import hashlib
import json
import random

import pytest

from revival.data import SPLITS, content_hash, load_corpus, make_corpus, split_documents, stdlib_corpus
from revival.data.corpora import split_key

LATIN1_BYTES = "café crème — naïve\n".encode("latin-1", errors="replace")


@pytest.fixture(scope="module")
def stdlib():
    return stdlib_corpus()


def _named(count, size=20):
    rng = random.Random(0)
    return [(f"dir{i % 7}/file_{i}.py", bytes(rng.randrange(32, 127) for _ in range(size))) for i in range(count)]


def test_split_key_is_sha256_prefix():
    expected = int(hashlib.sha256(b"pkg/mod.py").hexdigest()[:16], 16) / 2**64
    assert split_key("pkg/mod.py") == expected
    assert 0.0 <= split_key("") < 1.0


def test_split_is_deterministic_disjoint_and_complete():
    documents = _named(500)
    shuffled = documents[:]
    random.Random(1).shuffle(shuffled)
    first, second = split_documents(documents, 0.05, 0.05), split_documents(shuffled, 0.05, 0.05)
    assert first == second
    names = {split: {name for name, _ in first[split]} for split in SPLITS}
    assert not names["train"] & names["validation"] and not names["train"] & names["test"]
    assert not names["validation"] & names["test"]
    assert names["train"] | names["validation"] | names["test"] == {name for name, _ in documents}
    for name, _ in first["validation"]:
        assert split_key(name) < 0.05
    for name, _ in first["test"]:
        assert 0.05 <= split_key(name) < 0.10
    for name, _ in first["train"]:
        assert split_key(name) >= 0.10
    assert 5 <= len(first["validation"]) <= 50 and 5 <= len(first["test"]) <= 50


def test_every_split_gets_a_document_when_fractions_are_small():
    splits = split_documents(_named(3), 0.001, 0.001)
    assert [len(splits[split]) for split in SPLITS] == [1, 1, 1]


def test_fewer_than_three_documents_split_by_lines():
    text = b"".join(b"line %d\n" % i for i in range(100))
    splits = split_documents([("only.txt", text)], 0.1, 0.05)
    assert [name for name, _ in splits["validation"]] == ["only.txt#validation"]
    assert b"".join(data for split in SPLITS for _, data in splits[split]) == text
    assert splits["validation"][0][1].count(b"\n") == 10 and splits["test"][0][1].count(b"\n") == 5
    with pytest.raises(ValueError, match="at least 3 lines"):
        split_documents([("short.txt", b"one line\ntwo\n")])


def test_bad_fractions_and_duplicate_names_are_rejected():
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents(_named(5), 1.5, 0.0)
    with pytest.raises(ValueError, match="less than 1"):
        split_documents(_named(5), 0.6, 0.5)
    with pytest.raises(ValueError, match="unique"):
        split_documents([("a", b"x"), ("a", b"y"), ("b", b"z")])


def test_content_hash_ignores_order_and_split_but_sees_names_and_bytes():
    documents = _named(10)
    base = content_hash(documents)
    assert content_hash(reversed(documents)) == base
    assert make_corpus("x", documents, 0.2, 0.2).content_hash == make_corpus("y", documents, 0.4, 0.1).content_hash
    assert make_corpus("x", documents).content_hash == base
    changed_byte = [(documents[0][0], documents[0][1][:-1] + b"!")] + documents[1:]
    renamed = [("other.py", documents[0][1])] + documents[1:]
    assert content_hash(changed_byte) != base and content_hash(renamed) != base
    # no ambiguity between a name ending and the data starting
    assert content_hash([("ab", b"c")]) != content_hash([("a", b"bc")])


def test_stdlib_corpus_loads_with_hash_and_disjoint_splits(stdlib):
    assert stdlib.name == "stdlib" and len(stdlib.content_hash) == 64
    assert all(stdlib.split(split) for split in SPLITS)
    names = [set(stdlib.names[split]) for split in SPLITS]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    every_name = names[0] | names[1] | names[2]
    assert "os.py" in every_name and "json/__init__.py" in every_name
    assert not any("site-packages/" in name or "__pycache__" in name for name in every_name)
    assert not any(name.rsplit("/", 1)[-1].startswith("_sysconfigdata") for name in every_name)
    assert all(isinstance(document, bytes) and document for document in stdlib.train)
    assert stdlib.num_bytes("validation") < stdlib.num_bytes("train") / 20
    summary = stdlib.describe()
    assert summary["content_hash"] == stdlib.content_hash and summary["train_documents"] == len(stdlib.train)


def test_stdlib_corpus_is_deterministic_and_notests_variant_is_a_subset(stdlib):
    again = load_corpus("stdlib")
    assert again.content_hash == stdlib.content_hash and again.names == stdlib.names
    without_tests = load_corpus("stdlib-notests")
    assert set(without_tests.names["train"]) < set(stdlib.names["train"]) | set(stdlib.names["validation"]) | set(
        stdlib.names["test"]
    )
    assert not any(name.startswith("test/") for split in SPLITS for name in without_tests.names[split])


def test_stdlib_walk_reads_non_utf8_files_as_bytes(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "latin.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = '" + LATIN1_BYTES + b"'\n")
    for index in range(3):
        (tmp_path / f"mod{index}.py").write_text(f"x = {index}\n")
    for skipped in ("site-packages", "__pycache__", "config-3.11-x86_64-linux-gnu"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "skip.py").write_text("skipped = True\n")
    (tmp_path / "_sysconfigdata__linux.py").write_text("build = {}\n")
    corpus = stdlib_corpus(root=tmp_path)
    documents = dict(zip(sum((corpus.names[s] for s in SPLITS), []), sum((corpus.split(s) for s in SPLITS), [])))
    assert sorted(documents) == ["mod0.py", "mod1.py", "mod2.py", "pkg/latin.py"]
    with pytest.raises(UnicodeDecodeError):
        documents["pkg/latin.py"].decode("utf-8")
    assert LATIN1_BYTES in documents["pkg/latin.py"]


def test_user_text_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"".join(b"verse %d\n" % i for i in range(200)))
    corpus = load_corpus(path, validation_fraction=0.1, test_fraction=0.1)
    assert corpus.name == "book.txt" and corpus.validation[0].startswith(b"verse 160\n")
    assert b"".join(corpus.train + corpus.validation + corpus.test) == path.read_bytes()


def test_user_directory_recursive_with_non_utf8_and_binary_skipped(tmp_path):
    for index in range(6):
        folder = tmp_path / f"part{index % 2}" / "deep"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"doc{index}.txt").write_text(f"document {index}\n" * 5)
    (tmp_path / "latin.txt").write_bytes(LATIN1_BYTES)
    (tmp_path / ".hidden.txt").write_text("hidden\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\0\0")
    with pytest.warns(UserWarning, match="image.bin"):
        corpus = load_corpus(str(tmp_path))
    names = sorted(sum((corpus.names[s] for s in SPLITS), []))
    assert names == ["latin.txt"] + sorted(f"part{i % 2}/deep/doc{i}.txt" for i in range(6))
    assert LATIN1_BYTES in corpus.train + corpus.validation + corpus.test
    assert all(len(corpus.split(split)) >= 1 for split in SPLITS)


def test_user_jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"text": f"record {i} ü", "id": i} for i in range(20)]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    corpus = load_corpus(path)
    everything = sorted(corpus.train + corpus.validation + corpus.test)
    assert everything == sorted(f"record {i} ü".encode() for i in range(20))
    custom = tmp_path / "custom.jsonl"
    custom.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(5)))
    assert len(sum((load_corpus(custom, text_field="body").split(s) for s in SPLITS), [])) == 5


def test_missing_empty_and_unreadable_inputs_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="neither a known corpus name"):
        load_corpus(tmp_path / "nope.txt")
    empty_file, empty_dir = tmp_path / "empty.txt", tmp_path / "emptydir"
    empty_file.write_bytes(b"")
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty_file)
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty_dir)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2: not valid JSON"):
        load_corpus(bad_json)
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="string field 'text'"):
        load_corpus(no_field)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dangling.txt").symlink_to(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="dangling.txt could not be read"):
        load_corpus(broken)
    locked = tmp_path / "locked.txt"
    locked.write_text("secret\n" * 10)

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(locked), "read_bytes", refuse)
    with pytest.raises(ValueError, match="locked.txt could not be read"):
        load_corpus(locked)
