"""Hugging Face-style generate arguments: do_sample, max_length, eos_token_id, num_return_sequences, streamer,
attention_mask (unpadded)."""

from __future__ import annotations

import pytest
import torch

from revival import LanguageModel, ModelConfig
from revival.errors import UserError
from revival.generate import generate, stream

VOCAB = 23


@pytest.fixture(scope="module")
def model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=16, pattern="ms", num_heads=2, chunk_size=8)).eval()


PROMPT = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])


def test_do_sample_false_is_greedy_and_max_length_counts_the_prompt(model):
    greedy = generate(model, PROMPT, 5, temperature=0)
    assert torch.equal(generate(model, PROMPT, 5, do_sample=False), greedy)
    assert torch.equal(generate(model, PROMPT, max_length=9, do_sample=False), greedy)
    assert torch.equal(model.generate(PROMPT, max_length=9, do_sample=False), greedy)
    sampled = generate(model, PROMPT, 5, do_sample=True, temperature=0.7, seed=3)
    assert torch.equal(sampled, generate(model, PROMPT, 5, temperature=0.7, seed=3))
    with pytest.raises(UserError, match="max_length and max_new_tokens: expected one of them"):
        generate(model, PROMPT, 5, max_length=9)
    with pytest.raises(UserError, match="max_length: expected an integer >= the prompt length 4"):
        generate(model, PROMPT, max_length=3)
    with pytest.raises(UserError, match="max_new_tokens: expected the number of tokens"):
        generate(model, PROMPT)
    with pytest.raises(UserError, match="do_sample=True with temperature=0"):
        generate(model, PROMPT, 5, do_sample=True, temperature=0)


def test_eos_token_id_stops_like_stop_tokens(model):
    first = int(generate(model, PROMPT[:1], 1, temperature=0)[0, -1])
    out = generate(model, PROMPT[0], 6, temperature=0, eos_token_id=first)
    assert out.tolist() == [*PROMPT[0].tolist(), first]
    assert torch.equal(out, generate(model, PROMPT[0], 6, temperature=0, stop_tokens=[first]))
    with pytest.raises(UserError, match="eos_token_id and stop_tokens"):
        generate(model, PROMPT[0], 6, eos_token_id=1, stop_tokens=2)


def test_num_return_sequences_repeats_each_prompt_and_samples_each_row(model):
    out = generate(model, PROMPT, 6, num_return_sequences=3, temperature=1.5, seed=0)
    assert out.shape == (6, 10)
    assert torch.equal(out[:3, :4], PROMPT[:1].expand(3, 4)) and torch.equal(out[3:, :4], PROMPT[1:].expand(3, 4))
    assert len({tuple(row) for row in out[:3, 4:].tolist()}) > 1  # independent samples
    assert generate(model, [1, 2], 3, num_return_sequences=2, seed=0).shape == (2, 5)  # one prompt, two rows
    with pytest.raises(UserError, match="greedy decoding"):
        generate(model, PROMPT, 3, num_return_sequences=2, do_sample=False)


def test_streamer_callable_and_put_end_object(model):
    seen = []
    out = generate(model, PROMPT[0], 5, temperature=0, streamer=seen.append)
    assert seen == out[4:].tolist()

    class Recorder:  # the transformers streamer protocol: the prompt, then each new token, then end()
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, ids):
            self.puts.append(ids.clone())

        def end(self):
            self.ended = True

    recorder = Recorder()
    out = generate(model, PROMPT, 3, temperature=0, streamer=recorder)
    assert torch.equal(recorder.puts[0], PROMPT) and recorder.ended
    assert torch.equal(torch.stack(recorder.puts[1:], dim=1), out[:, 4:])


def test_attention_mask_all_ones_and_left_padding(model):
    ones = torch.ones_like(PROMPT)
    assert torch.equal(generate(model, PROMPT, 3, temperature=0, attention_mask=ones),
                       generate(model, PROMPT, 3, temperature=0))
    assert list(stream(model, PROMPT[0], 2, temperature=0, attention_mask=ones[:1]))
    padded = ones.clone()
    padded[1, 0] = 0  # row 1 is the 3-token prompt PROMPT[1, 1:], left-padded
    out = generate(model, PROMPT, 3, temperature=0, attention_mask=padded)
    assert torch.equal(out[1, 1:], generate(model, PROMPT[1, 1:], 3, temperature=0))
    with pytest.raises(UserError, match="left padding"):
        generate(model, PROMPT, 3, attention_mask=padded.flip(1))
    with pytest.raises(UserError, match="attention_mask: expected a tensor shaped like input_ids"):
        generate(model, PROMPT, 3, attention_mask=ones[:, :2])
