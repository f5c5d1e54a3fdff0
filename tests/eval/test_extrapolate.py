"""Length extrapolation: carried segments equal one forward, windows equal their explicit recomputation, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from revival.cli import main
from revival.data import ByteTokenizer
from revival.errors import UserError
from revival.eval.extrapolate import extrapolate, parse_multipliers, position_losses, window_position_losses
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
    assert set(recurrent["modes"]) == {"carried"} and set(attention["modes"]) == {"carried", "window"}
    carried = recurrent["modes"]["carried"]
    losses = position_losses(_model("mingru", num_blocks=2), sequences, 8)
    assert carried["loss_by_length"]["2x"] == pytest.approx(float(losses[:16].mean()))
    assert carried["ratio_to_1x"]["4x"] == pytest.approx(carried["loss_by_length"]["4x"] /
                                                         carried["loss_by_length"]["1x"])
    assert len(carried["loss_by_position"]) == 16  # bins of context // 4 = 2 positions over 32
    # the window never reads more than the training context, so at 1x both modes agree on the first stride
    assert attention["modes"]["window"]["loss_by_position"][:2] == attention["modes"]["carried"]["loss_by_position"][:2]
    with pytest.raises(UserError, match="needs rows of 65"):
        extrapolate(_model("mingru", num_blocks=2), sequences, 8, [8])


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
    assert (tmp_path / "out" / "extrapolation.png").stat().st_size > 1000
    assert "carried" in capsys.readouterr().out
