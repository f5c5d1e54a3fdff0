"""Length extrapolation: carried segments equal one forward, windows equal their explicit recomputation, the
carried / window ratios equal a direct computation and catch a model that breaks beyond its context, rows spread
over the split, the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from revival.cli import main
from revival.data import ByteTokenizer
from revival.errors import UserError
from revival.eval.extrapolate import (
    corpus_sequences,
    extrapolate,
    parse_multipliers,
    position_losses,
    spaced_rows,
    window_position_losses,
)
from revival.models import LanguageModel, preset_config


def _model(preset: str, **sizes) -> LanguageModel:
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size=32, d_model=32, num_heads=2, chunk_size=8, **sizes)
    return LanguageModel(config).double().eval()


def _full_losses(model, sequences):
    logits, _ = model(sequences[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), sequences[:, 1:], reduction="none").mean(0)


@pytest.mark.parametrize("preset", ["xlstm[1:1]", "llama"])
def test_carried_segments_equal_one_forward(preset):
    model = _model(preset, num_blocks=2)
    sequences = torch.randint(0, 32, (2, 41))
    torch.testing.assert_close(position_losses(model, sequences, 16), _full_losses(model, sequences).cpu())


def test_window_losses_equal_their_explicit_windows():
    model = _model("llama", num_blocks=2)
    sequences = torch.randint(0, 32, (2, 50))
    losses = window_position_losses(model, sequences, context=16)
    for position in (0, 7, 8, 15, 16, 30, 48):  # target position + 1 from a window ending at position
        window_end = (position // 8 + 1) * 8  # the window of the stride that scores this position
        begin = max(0, min(window_end, 49) - 16)
        logits, _ = model(sequences[:, begin : position + 1])
        expected = F.cross_entropy(logits[:, -1], sequences[:, position + 1], reduction="none").mean()
        torch.testing.assert_close(losses[position], expected)
        assert position - begin < 16  # never more context than trained


def test_extrapolate_summaries_and_modes():
    sequences = torch.randint(0, 32, (2, 4 * 8 + 1))
    recurrent = extrapolate(_model("mingru", num_blocks=2), sequences, 8, [1, 2, 4])
    attention = extrapolate(_model("llama", num_blocks=2), sequences, 8, [1, 2, 4])
    assert set(recurrent["modes"]) == set(attention["modes"]) == {"carried", "window"}  # every model, both modes
    carried = recurrent["modes"]["carried"]
    losses = position_losses(_model("mingru", num_blocks=2), sequences, 8)
    assert carried["loss_by_length"]["2x"] == pytest.approx(float(losses[:16].mean()))
    assert carried["loss_beyond_context"]["4x"] == pytest.approx(float(losses[8:32].mean()))
    assert carried["ratio_to_1x"]["4x"] == pytest.approx(carried["loss_by_length"]["4x"] /
                                                         carried["loss_by_length"]["1x"])
    assert len(carried["loss_by_position"]) == 16  # bins of context // 4 = 2 positions over 32
    assert set(recurrent["ratio_to_window"]) == {"1x", "2x", "4x"}
    assert set(recurrent["beyond_ratio_to_window"]) == {"2x", "4x"}  # nothing lies beyond the context at 1x
    with pytest.raises(UserError, match="needs rows of 65"):
        extrapolate(_model("mingru", num_blocks=2), sequences, 8, [8])


@torch.no_grad()
def _token_losses_direct(model, sequences, context):
    """(N, T) NLL of every target, carried: one forward over the row; window: one forward per target over the
    window `window_position_losses` documents (stride context // 2, at most context tokens, fresh state)."""
    inputs, targets = sequences[:, :-1], sequences[:, 1:]
    logits, _ = model(inputs)
    carried = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    n, stride = inputs.shape[1], context // 2
    window = torch.empty_like(carried)
    for position in range(n):
        end = min((position // stride + 1) * stride, n)
        logits, _ = model(inputs[:, max(0, end - context) : position + 1])
        window[:, position] = F.cross_entropy(logits[:, -1], targets[:, position], reduction="none")
    return carried, window


@pytest.mark.parametrize("preset", ["mingru", "llama"])
def test_ratios_to_window_equal_their_direct_computation(preset):
    model = _model(preset, num_blocks=2)
    torch.manual_seed(1)
    sequences = torch.randint(0, 32, (3, 4 * 8 + 1))
    result = extrapolate(model, sequences, 8, [1, 2, 4])
    carried, window = _token_losses_direct(model, sequences, 8)
    for m in (1, 2, 4):  # the mean over every (row, target) pair of the range
        assert result["ratio_to_window"][f"{m}x"] == pytest.approx(
            float(carried[:, : 8 * m].mean() / window[:, : 8 * m].mean()), rel=1e-12)
    for m in (2, 4):
        assert result["beyond_ratio_to_window"][f"{m}x"] == pytest.approx(
            float(carried[:, 8 : 8 * m].mean() / window[:, 8 : 8 * m].mean()), rel=1e-12)
        assert result["modes"]["window"]["loss_beyond_context"][f"{m}x"] == pytest.approx(
            float(window[:, 8 : 8 * m].mean()), rel=1e-12)


@pytest.mark.parametrize("preset", ["xlstm-large", "xlstm[1:1]", "mingru", "mamba2", "gated-deltanet", "llama"])
def test_carried_equals_window_inside_the_training_context_only(preset):
    model = _model(preset, num_blocks=2)
    sequences = torch.randint(0, 32, (2, 3 * 16 + 1))
    carried = position_losses(model, sequences, 16)
    window = window_position_losses(model, sequences, 16)
    torch.testing.assert_close(window[:16], carried[:16].double(), rtol=1e-10, atol=1e-10)  # same prefix: from 0
    assert (window[16:] - carried[16:].double()).abs().max() > 1e-6  # beyond it the window forgets: they differ
    assert extrapolate(model, sequences, 16, [1, 3])["ratio_to_window"]["1x"] == pytest.approx(1.0, abs=1e-12)


class _BreaksBeyond(torch.nn.Module):
    """Uniform logits until it has read `limit` tokens, then a confident guess of token 0: a model that breaks
    beyond its context, its losses in closed form (targets never 0: log(e^strength + V - 1) against log V)."""

    def __init__(self, vocab_size: int, limit: int, strength: float):
        super().__init__()
        self.vocab_size, self.limit, self.strength = vocab_size, limit, strength
        self.config, self.device = SimpleNamespace(pattern="toy"), torch.device("cpu")

    def forward(self, inputs, state=None):
        seen = 0 if state is None else state
        logits = torch.zeros(*inputs.shape, self.vocab_size, dtype=torch.float64)
        logits[:, seen + torch.arange(inputs.shape[1]) >= self.limit, 0] = self.strength
        return logits, seen + inputs.shape[1]


def test_beyond_ratio_catches_a_model_that_breaks_beyond_its_context():
    vocab, context, strength = 16, 8, 3.0
    sequences = torch.randint(1, vocab, (2, 4 * context + 1))
    result = extrapolate(_BreaksBeyond(vocab, context, strength), sequences, context, [1, 2, 4])
    uniform, broken = math.log(vocab), math.log(math.exp(strength) + vocab - 1)
    assert result["ratio_to_window"]["1x"] == pytest.approx(1.0, rel=1e-12)
    assert result["beyond_ratio_to_window"]["4x"] == pytest.approx(broken / uniform, rel=1e-12)
    assert result["ratio_to_window"]["4x"] == pytest.approx((uniform + 3 * broken) / (4 * uniform), rel=1e-12)
    assert result["modes"]["window"]["ratio_to_1x"]["4x"] == pytest.approx(1.0, rel=1e-12)  # never past the limit


def test_spaced_rows_spread_over_the_stream():
    stream = torch.arange(100)
    assert spaced_rows(stream, 10, 4)[:, 0].tolist() == [0, 30, 60, 90]  # first at the start, last at the end
    assert spaced_rows(stream, 10, 50)[:, 0].tolist() == list(range(0, 100, 10))  # at most len // length rows
    assert spaced_rows(stream, 33, 3)[:, 0].tolist() == [0, 33, 67] and spaced_rows(stream, 10, 1).shape == (1, 10)
    assert spaced_rows(stream, 101, 2).shape == (0, 101)
    with pytest.raises(ValueError, match="count 0"):
        spaced_rows(stream, 10, 0)


def test_corpus_sequences_read_the_whole_split():
    tokenizer = ByteTokenizer()
    documents = [f"document {i}: ".encode() + bytes([65 + i % 26]) * 40 for i in range(30)]
    stream = torch.cat([torch.tensor([tokenizer.eos_id, *tokenizer.encode(d)]) for d in documents])
    rows = corpus_sequences(documents, tokenizer, 50, 3)
    assert rows.shape == (3, 50) and rows[0, 0] == tokenizer.eos_id  # packed as the trainer packs: [eos] + document
    torch.testing.assert_close(rows[-1], stream[-50:])  # the last row ends where the split ends
    with pytest.raises(UserError, match="--sequences"):
        corpus_sequences(documents, tokenizer, 50, 0)
    with pytest.raises(UserError, match="fewer than one row"):
        corpus_sequences(documents, tokenizer, stream.numel() + 1, 3)


def test_parse_multipliers():
    assert parse_multipliers("4x,1x,2") == [1, 2, 4]
    with pytest.raises(UserError, match="--extrapolate"):
        parse_multipliers("1x,two")


def test_eval_extrapolate_command(tmp_path, capsys):
    torch.manual_seed(0)
    model = LanguageModel(preset_config("hybrid", vocab_size=257, d_model=32, num_blocks=4, num_heads=2))
    model.save_pretrained(tmp_path / "model", tokenizer=ByteTokenizer())
    (tmp_path / "text.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(2000)))
    status = main(["eval", str(tmp_path / "model"), "--corpus", str(tmp_path / "text.txt"), "--extrapolate", "1x,4x",
                   "--context-length", "16", "--sequences", "2", "--out", str(tmp_path / "out"), "--device", "cpu",
                   "--no-progress"])
    assert status == 0
    result = json.loads((tmp_path / "out" / "extrapolation.json").read_text())
    assert result["sequences"] == 2 and result["tokens_per_sequence"] == 65
    assert set(result["modes"]) == {"carried", "window"} and set(result["modes"]["carried"]["loss_by_length"]) == \
        {"1x", "4x"}
    assert set(result["ratio_to_window"]) == {"1x", "4x"} and set(result["beyond_ratio_to_window"]) == {"4x"}
    assert (tmp_path / "out" / "extrapolation.png").stat().st_size > 1000
    assert "carried / window on the same tokens, beyond the training context: 4x" in capsys.readouterr().out
