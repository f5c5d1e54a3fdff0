"""MQAR end to end without training: a causal key-value lookup scores 1.0 and a copy of the input scores 0 on the
pipeline's own accuracy and loss (issue 22: the GPU study's MQAR 0 was not a generator, masking or metric bug)."""

import torch
import torch.nn.functional as F

from revival.data.tasks import IGNORE, mqar
from revival.eval.tasks import _scored_loss, accuracy


class CausalLookup(torch.nn.Module):
    """Logits that put all mass, at each position, on the value that followed the same token earlier in the
    sequence (the answer a perfect recall model gives), or on the token itself (`copy`: what a model that ignores
    the context would say)."""

    def __init__(self, vocab_size: int, copy: bool = False):
        super().__init__()
        self.vocab_size, self.copy = vocab_size, copy
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, inputs):
        B, T = inputs.shape
        answer = torch.zeros_like(inputs)
        for b in range(B):
            first: dict[int, int] = {}
            for t, token in enumerate(inputs[b].tolist()):
                if token in first:  # the token that followed this one's first occurrence
                    answer[b, t] = inputs[b, first[token] + 1]
                first.setdefault(token, t)
        if self.copy:
            answer = inputs
        logits = F.one_hot(answer, self.vocab_size).float() * 20 + self.anchor
        return logits, None

    @property
    def device(self):
        return self.anchor.device


def test_a_causal_lookup_gets_every_query_right_and_a_copy_gets_none():
    data = mqar(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=50, seed=2)
    assert int((data.targets != IGNORE).sum()) == 50 * 4  # only the query positions are scored
    right = accuracy(CausalLookup(64), data, batch_size=16)
    assert right["accuracy"] == 1.0 and right["sequence_accuracy"] == 1.0 and right["scored"] == 200
    with torch.no_grad():
        assert float(_scored_loss(CausalLookup(64), data.inputs, data.targets, torch.device("cpu"))) < 1e-6
    wrong = accuracy(CausalLookup(64, copy=True), data, batch_size=16)
    assert wrong["accuracy"] == 0.0
