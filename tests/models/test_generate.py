"""Generation: logits processors, greedy/seeded sampling, stop tokens, streaming, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from revival import LanguageModel, ModelConfig
from revival.generate import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    process_logits,
    sample_next,
    stream,
)

VOCAB = 29


@pytest.fixture(scope="module", params=["ms", "xa"])
def model(request) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=16, num_heads=2, pattern=request.param, chunk_size=8)
    model = LanguageModel(config).double().eval()
    with torch.no_grad():  # a peaked, input-dependent distribution so greedy/sampling paths differ
        model.lm_head.weight.mul_(20.0)
    return model


# ---------------------------------------------------------------------- logits processors


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(out[torch.isfinite(out)], torch.tensor([5.0, 4.0]))
    assert torch.equal(apply_top_k(logits, 10), logits)


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(apply_top_p(logits, p)).tolist()[0]  # noqa: E731
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(1e-6) == [True, False, False, False]  # never empty
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary must not matter
    assert torch.isfinite(apply_top_p(shuffled, 0.6)).tolist()[0] == [False, True, False, True]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert torch.equal(apply_repetition_penalty(logits, torch.tensor([[0]]), 1.0), logits)


def test_process_logits_temperature_then_filters():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = process_logits(logits, torch.zeros(1, 0, dtype=torch.long), temperature=0.5, top_k=2)
    assert out[0, 0] == -math.inf and torch.allclose(out[0, 1:], torch.tensor([4.0, 6.0]))


def test_sample_next_greedy_and_top_k_one():
    logits = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(4, 0, dtype=torch.long)
    assert torch.equal(sample_next(logits, none, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, none, temperature=3.0, top_k=1), logits.argmax(-1))
    # A heavy penalty on the argmax moves greedy to the runner-up.
    penalised = sample_next(logits.abs() + 1, logits.abs().argmax(-1, keepdim=True), temperature=0,
                            repetition_penalty=1e6)
    assert not torch.equal(penalised, logits.abs().argmax(-1))


def test_sampling_matches_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, 2)
    draws = sample_next(logits, torch.zeros(20000, 0, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert abs(draws.float().mean().item() - 0.75) < 0.015


# ---------------------------------------------------------------------- generation with a model


def test_greedy_matches_recomputing_the_whole_sequence(model):
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, 8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():  # no state: rerun the full prefix each step
        ids = prompt
        for _ in range(8):
            ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    assert torch.equal(model.generate(prompt, 8, temperature=0), out)


def test_seed_reproducible_and_seeds_differ(model):
    prompt = [3, 1, 4, 1, 5]
    a = model.generate(prompt, 12, temperature=1.0, seed=7)
    b = model.generate(prompt, 12, temperature=1.0, seed=7)
    c = model.generate(prompt, 12, temperature=1.0, seed=8)
    assert a.shape == (17,) and a.tolist()[:5] == prompt
    assert torch.equal(a, b) and not torch.equal(a, c)
    top = model.generate(prompt, 12, temperature=0.8, top_k=3, top_p=0.9, repetition_penalty=1.3, seed=7)
    assert top.shape == (17,)


def test_stop_tokens_stop_generation(model):
    prompt = [2, 7, 1]
    free = model.generate(prompt, 10, temperature=0).tolist()
    stop = free[3 + 3]  # the 4th generated token
    first = free.index(stop, 3)
    stopped = model.generate(prompt, 10, temperature=0, stop_tokens=[stop])
    assert stopped.tolist() == free[:first + 1]
    assert model.generate(prompt, 10, temperature=0, stop_tokens=stop).tolist() == free[:first + 1]


def test_batch_rows_that_stop_repeat_their_stop_token(model):
    prompts = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(3))
    free = model.generate(prompts, 6, temperature=0)
    stop = int(free[0, 4])  # row 0 stops at once
    out = model.generate(prompts, 6, temperature=0, stop_tokens=[stop])
    cuts = []
    for row in range(3):
        new = free[row, 4:].tolist()
        cut = new.index(stop) + 1 if stop in new else len(new)
        cuts.append(cut)
        expected = new[:cut] + [stop] * (len(new) - cut)
        assert out[row, 4:].tolist() == expected[:out.shape[1] - 4]
    assert out.shape[1] == 4 + max(cuts)  # generation ends once every row has stopped
    assert (out[0, 4:] == stop).all()


def test_stream_yields_the_tokens_generate_returns(model):
    prompt = [5, 6, 7]
    streamed = list(model.stream(prompt, 9, temperature=0.9, top_p=0.8, seed=3))
    assert all(isinstance(t, int) for t in streamed)
    assert model.generate(prompt, 9, temperature=0.9, top_p=0.8, seed=3).tolist() == prompt + streamed
    batch = torch.tensor([prompt, prompt[::-1]])
    rows = torch.stack(list(stream(model, batch, 4, temperature=0)), dim=1)
    assert torch.equal(generate(model, batch, 4, temperature=0)[:, 3:], rows)
    assert list(model.stream(prompt, 0)) == [] and model.generate(prompt, 0).tolist() == prompt


def test_generation_leaves_grad_mode_and_training_flag_alone(model):
    model.train()
    iterator = model.stream([1, 2], 3, temperature=0)
    next(iterator)
    assert torch.is_grad_enabled() and model.training
    list(iterator)
    model.eval()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=0.0), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_tokens=[VOCAB]), "stop_tokens"),
    (dict(stop_tokens="x"), "stop_tokens"),
    (dict(seed=1.5), "seed"),
    (dict(input_ids=[]), "input_ids"),
    (dict(input_ids=[1, VOCAB]), r"input_ids: token ids must lie in \[0, 29\)"),
    (dict(input_ids=torch.zeros(1, 2, 3, dtype=torch.long)), "input_ids"),
])
def test_bad_arguments_raise_clear_errors(model, kwargs, match):
    args = dict(input_ids=[1, 2], max_new_tokens=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)
    with pytest.raises(ValueError, match=match):
        stream(model, **args)  # checked when called, not at the first next()
