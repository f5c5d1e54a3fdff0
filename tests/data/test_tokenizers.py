"""Tokenizers: byte-level exact round trips, BPE trained on a tiny corpus, save/load detection, byte counting."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from revival.data import EOS_TOKEN, ByteTokenizer, HFTokenizer, count_utf8_bytes, load_tokenizer, make_tokenizer
from revival.data.tokenizers import as_text

TINY_CORPUS = [
    (f"def function_{i}(value):\n    return value * {i} + len('naïve text {i}')\n\n" * 3).encode() for i in range(40)
] + ["The quick brown fox — jumps over the lazy dog. ünïcödé 東京 🎉\n".encode() * 5]


@pytest.fixture(scope="module")
def bpe():
    return make_tokenizer("bpe", TINY_CORPUS, vocab_size=320)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_any_unicode_exactly(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text.encode("utf-8")) == ids


def test_byte_tokenizer_specials_and_invalid_input():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
    assert tokenizer.encode(EOS_TOKEN) == list(EOS_TOKEN.encode())  # the text is never the special id
    assert tokenizer.decode([104, 105, 256, 33]) == f"hi{EOS_TOKEN}!"
    assert tokenizer.encode(b"caf\xe9") == list("caf\ufffd".encode())  # invalid UTF-8 -> U+FFFD, as as_text
    assert tokenizer.decode([0xE6, 0x9D]) == "\ufffd"
    with pytest.raises(ValueError, match="token id 300"):
        tokenizer.decode([300])
    with pytest.raises(ValueError, match="expected str or bytes"):
        tokenizer.encode(123)


def test_bpe_trains_to_the_requested_size_and_compresses(bpe):
    assert isinstance(bpe, HFTokenizer)
    assert bpe.vocab_size == 320 and bpe.eos_id == 0
    text = TINY_CORPUS[3].decode()
    assert len(bpe.encode(text)) < len(text.encode()) / 2
    assert bpe.encode_batch(TINY_CORPUS[:3]) == [bpe.encode(document) for document in TINY_CORPUS[:3]]
    assert bpe.encode(EOS_TOKEN) == [bpe.eos_id]
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size=100"):
        make_tokenizer("bpe", TINY_CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="documents=None"):
        make_tokenizer("bpe")
    with pytest.raises(ValueError, match="'byte' or 'bpe'"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="non-empty"):
        make_tokenizer("bpe", [b""], vocab_size=300)


def test_bpe_training_is_deterministic_and_max_bytes_limits_the_data():
    first = make_tokenizer("bpe", TINY_CORPUS, vocab_size=300)
    second = make_tokenizer("bpe", TINY_CORPUS, vocab_size=300)
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    limited = make_tokenizer("bpe", TINY_CORPUS, vocab_size=300, max_bytes=1)
    assert limited.tokenizer.to_str() != first.tokenizer.to_str()


def test_save_and_load_identity(tmp_path, bpe):
    sample = "def f(x):\n    return 'ünï' + x  # 🎉\n"
    for tokenizer in (ByteTokenizer(), bpe):
        directory = tmp_path / tokenizer.kind
        tokenizer.save(directory)
        loaded = load_tokenizer(directory)
        assert type(loaded) is type(tokenizer)
        assert (loaded.vocab_size, loaded.eos_id) == (tokenizer.vocab_size, tokenizer.eos_id)
        assert loaded.encode(sample) == tokenizer.encode(sample)
        assert loaded.decode(loaded.encode(sample)) == sample
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert not any(path.name.startswith(".") for path in (tmp_path / "hf").iterdir())  # no temp files left


def test_load_hub_style_tokenizer_json(tmp_path, bpe):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text(bpe.tokenizer.to_str())
    assert load_tokenizer(bare).eos_id == bpe.eos_id  # found among known special tokens
    configured = tmp_path / "configured"
    configured.mkdir()
    (configured / "tokenizer.json").write_text(bpe.tokenizer.to_str())
    (configured / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": EOS_TOKEN}}))
    assert load_tokenizer(configured).eos_token == EOS_TOKEN
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_count_utf8_bytes_matches_byte_tokens():
    documents = [b"plain ascii", "ünïcödé 🎉".encode(), b"latin-1 caf\xe9", "a str document"]
    tokenizer = ByteTokenizer()
    assert count_utf8_bytes(documents) == sum(len(tokenizer.encode(document)) for document in documents)
    assert count_utf8_bytes([b"caf\xe9"]) == len("caf\ufffd".encode()) == 6
    assert as_text(b"caf\xe9") == "caf\ufffd"
