"""torch.compile: the graph breaks of a tiny model's forward are counted, so a new one (a .item(), a Python check on a
tensor, a data-dependent branch) fails here. The mLSTM/sLSTM autograd.Functions run eagerly by design
(torch.compiler.disable in revival/ops/{mlstm,slstm}/__init__.py): one break per enclosing frame (model, block,
layer) at each call, and no other."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo

from revival import LanguageModel, preset_config

VOCAB = 64
OPAQUE_OP = "torch.compiler.disable"  # the break reason of the ops that run eagerly on purpose


def tiny_model(name: str, num_blocks: int = 2) -> LanguageModel:
    torch.manual_seed(0)
    config = preset_config(name, vocab_size=VOCAB, d_model=32, num_heads=2, num_blocks=num_blocks, chunk_size=8)
    return LanguageModel(config)


def explain(model: LanguageModel, ids: torch.Tensor):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(model)(ids)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name, breaks_per_block", [("llama", 0), ("xlstm[1:0]", 3), ("xlstm[0:1]", 3)])
def test_graph_breaks_of_a_tiny_forward(name, breaks_per_block):
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    result = explain(model, ids)
    reasons = [reason.reason.splitlines()[0] for reason in result.break_reasons]
    unexpected = [reason for reason in reasons if OPAQUE_OP not in reason]
    assert unexpected == [], f"{name}: graph breaks other than the eager ops: {unexpected}"
    assert result.graph_break_count == breaks_per_block * len(model.blocks), reasons


def test_llama_compiles_to_one_graph_with_the_eager_outputs():
    model = tiny_model("llama").eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        logits, _, loss = compiled(ids, labels=ids)
    finally:
        torch._dynamo.reset()
    expected_logits, _, expected_loss = model(ids, labels=ids)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(loss, expected_loss)


def test_compiling_an_xlstm_prints_no_graph_break_warnings(capfd):
    model = tiny_model("xlstm[1:1]", num_blocks=4)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.compile(model, backend="eager")(ids, labels=ids)[2].backward()
    finally:
        torch._dynamo.reset()
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""
