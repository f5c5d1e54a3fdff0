"""Data: corpora (embedded stdlib default, cached builders, user data), tokenizers, packing.

Entry points: :func:`load_corpus`, :func:`make_tokenizer` / :func:`load_tokenizer`, :class:`PackedDataset`,
:func:`iter_document_tokens`, :func:`count_utf8_bytes`.
"""

from .builders import BUILDERS, CorpusBuildError, build_corpus, cache_root, load_cached_corpus
from .corpora import SPLITS, Corpus, content_hash, make_corpus, split_documents, stdlib_corpus, user_corpus
from .load import DEFAULT_CORPUS, corpus_names, load_corpus
from .packing import Batch, PackedDataset, iter_document_tokens, pack_documents
from .tokenizers import (
    EOS_TOKEN,
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    as_text,
    count_utf8_bytes,
    load_tokenizer,
    make_tokenizer,
    train_bpe,
)

__all__ = [
    "BUILDERS",
    "DEFAULT_CORPUS",
    "EOS_TOKEN",
    "SPLITS",
    "Batch",
    "ByteTokenizer",
    "Corpus",
    "CorpusBuildError",
    "HFTokenizer",
    "PackedDataset",
    "Tokenizer",
    "as_text",
    "build_corpus",
    "cache_root",
    "content_hash",
    "corpus_names",
    "count_utf8_bytes",
    "iter_document_tokens",
    "load_cached_corpus",
    "load_corpus",
    "load_tokenizer",
    "make_corpus",
    "make_tokenizer",
    "pack_documents",
    "split_documents",
    "stdlib_corpus",
    "train_bpe",
    "user_corpus",
]
