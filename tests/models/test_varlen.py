"""Whole models on packed rows: `document_starts` gives each document exactly its separate-call logits, final state
and the same parameter gradients (float64, every block kind and hybrids); `attention_mask` left padding gives the
unpadded logits; left-padded batched `generate` equals unpadded single calls."""

from __future__ import annotations

import pytest
import torch

from revival.generate import generate
from revival.ops._documents import from_attention_mask
from tests.models.test_model import VOCAB, tiny_model
from tests.ops.test_varlen import T, check_packed

PATTERNS = ["s", "x", "a", "gl", "Md", "msxa"]
MODEL_LAYOUTS = [[1, 7, 8, 11], [8, 1, 18]]  # starts on the chunk edges 8 and 16 (chunk size 8), a 1-token document


@pytest.mark.parametrize("pattern", PATTERNS)
def test_model_packed_equals_separate(pattern):
    model = tiny_model(pattern).train()  # dropout is 0: train mode only turns autograd bookkeeping on
    ids = torch.randint(0, VOCAB, (len(MODEL_LAYOUTS), T), generator=torch.Generator().manual_seed(2))

    def run(time_inputs, shared, state, starts):
        return model(time_inputs[0], state, document_starts=starts)
    check_packed(run, [ids], [1], [], 1, layouts=MODEL_LAYOUTS, parameters=list(model.parameters()),
                 states="a" not in pattern, cut_states=False)


def test_attention_mask_left_padding_gives_the_unpadded_logits():
    model = tiny_model("msxa")
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    expected, _ = model(ids)
    padded = torch.cat([torch.randint(0, VOCAB, (1, 4)), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    logits, _ = model(padded, attention_mask=mask)
    torch.testing.assert_close(logits[:, 4:], expected, atol=1e-10, rtol=0)
    logits_starts, _ = model(padded, document_starts=from_attention_mask(mask))
    assert torch.equal(logits_starts, logits)


@pytest.mark.parametrize("pattern", ["msxa", "gl", "Md"])
def test_left_padded_batched_generate_equals_single_calls(pattern):
    model = tiny_model(pattern)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator) for n in (7, 3, 1, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = generate(model, ids, 6, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        single = generate(model, prompt, 6, temperature=0)
        assert torch.equal(batched[row, width - len(prompt):], single), (pattern, row)


def test_attention_mask_is_validated():
    model = tiny_model("m")
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="document_starts"):
        model(ids, document_starts=torch.ones(2, 5, dtype=torch.long))
