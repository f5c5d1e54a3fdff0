"""Packing: stream layout with separators, document boundaries, shapes, deterministic shuffling, resume position."""

import pytest
import torch

from revival.data import ByteTokenizer, PackedDataset, iter_document_tokens, make_tokenizer, pack_documents

EOS = 256
DOCUMENTS = [f"document number {i}: {'x' * (i * 7 % 23)}\n".encode() for i in range(30)]


def _dataset(context_length=16, seed=0, shuffle=True):
    return PackedDataset.from_documents(DOCUMENTS, ByteTokenizer(), context_length, seed=seed, shuffle=shuffle)


def test_stream_layout_separators_and_document_starts():
    stream, doc_start = pack_documents([b"ab", b"cde", "é"], ByteTokenizer())
    assert stream.tolist() == [EOS, 97, 98, EOS, 99, 100, 101, EOS, 0xC3, 0xA9, EOS]
    assert doc_start.tolist() == [True, False, False, True, False, False, False, True, False, False, False]
    assert stream.dtype == torch.int32 and doc_start.dtype == torch.bool


def test_every_document_start_is_a_separator_followed_by_the_document():
    stream, doc_start = pack_documents(DOCUMENTS, ByteTokenizer())
    starts = doc_start.nonzero().flatten().tolist()
    assert len(starts) == len(DOCUMENTS)
    for start, document in zip(starts, DOCUMENTS):
        assert stream[start] == EOS
        assert bytes(stream[start + 1 : start + 1 + len(document)].tolist()) == document
    assert stream[-1] == EOS and not doc_start[-1]
    assert stream.numel() == sum(map(len, DOCUMENTS)) + len(DOCUMENTS) + 1


def test_sequences_shapes_and_shift():
    dataset = _dataset(context_length=16, shuffle=False)
    assert dataset.num_sequences == (dataset.stream.numel() - 1) // 16 == len(dataset)
    assert dataset.num_tokens == dataset.num_sequences * 16
    batch = dataset.batch(0, 5)
    for tensor in (batch.input_ids, batch.targets, batch.doc_start):
        assert tensor.shape == (5, 16)
    assert batch.input_ids.dtype == torch.long and batch.doc_start.dtype == torch.bool
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    assert torch.equal(batch.targets[:-1, -1], batch.input_ids[1:, 0])  # unshuffled rows are consecutive windows
    inputs = torch.cat([dataset.sequence(index)[0] for index in range(dataset.num_sequences)])
    assert torch.equal(inputs, dataset.stream[: dataset.num_tokens].long())
    starts = torch.cat([dataset.sequence(index)[2] for index in range(dataset.num_sequences)])
    assert torch.equal(starts, dataset.doc_start[: dataset.num_tokens])
    assert torch.equal(batch.doc_start, batch.input_ids == EOS)  # byte documents hold no EOS themselves


def test_shuffling_is_a_seeded_permutation_per_epoch():
    dataset = _dataset(seed=3)
    n = dataset.num_sequences
    epoch0 = [dataset.sequence_index(p) for p in range(n)]
    epoch1 = [dataset.sequence_index(p) for p in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1 and epoch0 != list(range(n))
    assert [_dataset(seed=3).sequence_index(p) for p in range(n)] == epoch0
    assert [_dataset(seed=4).sequence_index(p) for p in range(n)] != epoch0
    assert [_dataset(shuffle=False).sequence_index(p) for p in range(n)] == list(range(n))


def test_resume_from_saved_position_is_bit_identical():
    straight = []
    for (batch, _), _ in zip(_dataset(seed=7).batches(batch_size=3), range(30)):
        straight.append(batch)
    first_run, position = _dataset(seed=7), 0
    for step in range(8):
        batch = first_run.batch(position, 3)
        position += 3
        assert torch.equal(batch.input_ids, straight[step].input_ids)
    assert position == 24 and 30 * 3 > first_run.num_sequences  # the run below crosses an epoch boundary
    resumed = [batch for (batch, _), _ in zip(_dataset(seed=7).batches(3, position=position), range(22))]
    assert len(resumed) == len(straight[8:]) == 22
    for expected, got in zip(straight[8:], resumed):
        assert torch.equal(expected.input_ids, got.input_ids)
        assert torch.equal(expected.targets, got.targets)
        assert torch.equal(expected.doc_start, got.doc_start)


def test_bad_arguments_are_rejected():
    stream, doc_start = pack_documents(DOCUMENTS[:2], ByteTokenizer())
    with pytest.raises(ValueError, match="context_length=0"):
        PackedDataset(stream, doc_start, 0)
    with pytest.raises(ValueError, match="at least context_length"):
        PackedDataset(stream, doc_start, 10_000)
    with pytest.raises(ValueError, match="1-D"):
        PackedDataset(stream, doc_start[:-1], 4)
    dataset = PackedDataset(stream, doc_start, 4)
    with pytest.raises(ValueError, match="batch_size=0"):
        dataset.batch(0, 0)
    with pytest.raises(ValueError, match="position=-1"):
        dataset.batch(-1, 2)


def test_bpe_packing_uses_its_eos_id():
    tokenizer = make_tokenizer("bpe", DOCUMENTS, vocab_size=280)
    dataset = PackedDataset.from_documents(DOCUMENTS, tokenizer, context_length=8, seed=0)
    starts = dataset.doc_start.nonzero().flatten()
    assert len(starts) == len(DOCUMENTS) and bool((dataset.stream[starts] == tokenizer.eos_id).all())
    assert tokenizer.decode(dataset.stream.tolist()).count("<|endoftext|>") == len(DOCUMENTS) + 1


def test_validation_iterates_whole_documents():
    tokenizer = ByteTokenizer()
    documents = [b"first doc", b"", "second ü".encode()]
    tensors = list(iter_document_tokens(documents, tokenizer))
    assert [tensor.tolist() for tensor in tensors] == [[EOS, *b"first doc"], [EOS, *"second ü".encode()]]
    assert tensors[0].dtype == torch.long
    closed = list(iter_document_tokens(documents, tokenizer, append_eos=True))
    assert closed[1].tolist() == [EOS, *"second ü".encode(), EOS]
