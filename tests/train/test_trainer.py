"""Trainer: loss goes down, NaN/inf steps skipped and counted, gradient accumulation, evaluation, CSV/PNG outputs."""

from __future__ import annotations

import math

import pytest
import torch

from revival.data import ByteTokenizer
from revival.models import LanguageModel, preset_config
from revival.train.logging import plot_loss_curves, read_metrics
from revival.train.trainer import Trainer, TrainingStopped, evaluate

from .conftest import tiny_run


def test_loss_decreases_on_a_repetitive_corpus(tmp_path, tiny_corpus):
    trainer = Trainer(tiny_run(tmp_path, steps=30, lr=1e-2, warmup_steps=3), corpus=tiny_corpus)
    summary = trainer.train()
    losses = summary["losses"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    assert losses[0] == pytest.approx(math.log(257), rel=0.1)  # starts near uniform over the byte vocabulary
    assert summary["tokens_seen"] == 30 * 4 * 16
    assert summary["val"]["loss"] < losses[0]


def _poison(trainer, bad_calls):
    """Make the model's forward return NaN logits on the given call numbers (0-based)."""
    forward, calls = trainer.model.forward, {"n": 0}

    def poisoned(*args, **kwargs):
        logits, state = forward(*args, **kwargs)
        n = calls["n"]
        calls["n"] += 1
        return (logits * float("nan") if n in bad_calls else logits), state

    trainer.model.forward = poisoned


def test_non_finite_loss_is_skipped_and_counted(tmp_path, tiny_corpus):
    trainer = Trainer(tiny_run(tmp_path, steps=3, max_bad_steps=2), corpus=tiny_corpus)
    trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _poison(trainer, bad_calls={0})
    loss = trainer.train_step()
    assert math.isnan(loss)
    assert trainer.skipped_steps == 1 and trainer.bad_steps_in_a_row == 1
    for name, value in trainer.model.state_dict().items():  # the bad step changed nothing
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in trainer.model.parameters())
    assert math.isfinite(trainer.train_step())  # call 1 is fine again
    assert trainer.bad_steps_in_a_row == 0 and trainer.skipped_steps == 1


def test_too_many_non_finite_losses_in_a_row_stop_training(tmp_path, tiny_corpus):
    trainer = Trainer(tiny_run(tmp_path, steps=10, max_bad_steps=3), corpus=tiny_corpus)
    _poison(trainer, bad_calls=set(range(1, 100)))
    with pytest.raises(TrainingStopped) as error:
        trainer.train()
    message = str(error.value)
    assert "3 non-finite losses in a row" in message and "train.max_bad_steps=3" in message
    assert trainer.skipped_steps == 3 and trainer.step == 3  # stopped during the 4th step (1 good + 3 bad)


def _captured_gradients(trainer) -> list[torch.Tensor]:
    grads, step = [], trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.append([p.grad.clone() for p in trainer.model.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    return grads


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_gradient_accumulation_matches_a_larger_batch(tmp_path, tiny_corpus):
    big = Trainer(tiny_run(tmp_path / "big", batch_size=8, grad_accum=1, grad_clip=1e9), corpus=tiny_corpus)
    small = Trainer(tiny_run(tmp_path / "small", batch_size=4, grad_accum=2, grad_clip=1e9), corpus=tiny_corpus)
    big_grads, small_grads = _captured_gradients(big), _captured_gradients(small)
    for _ in range(2):
        assert big.train_step() == pytest.approx(small.train_step(), rel=1e-5)
    assert big.tokens_seen == small.tokens_seen == 2 * 8 * 16 and big.position == small.position == 16
    for step_big, step_small in zip(big_grads, small_grads):
        for a, b in zip(step_big, step_small):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_evaluate_loss_perplexity_bits_per_byte(tiny_corpus):
    torch.manual_seed(0)
    model = LanguageModel(preset_config("xlstm[1:1]", vocab_size=257, d_model=32, num_blocks=2, num_heads=2,
                                        chunk_size=8))
    tokenizer = ByteTokenizer()
    documents = [b"def f(x):\n    return x * 2\n" * 3, "caf\u00e9 = '\u00e9t\u00e9'\n".encode()]
    result = evaluate(model, documents, tokenizer, context_length=8, device=torch.device("cpu"))
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-9)
    num_bytes = sum(len(d) for d in documents)
    assert result.tokens == num_bytes  # byte tokenizer: one target per byte
    assert result.bits_per_byte == pytest.approx(result.loss * result.tokens / (math.log(2) * num_bytes), rel=1e-9)
    # State carried across 8-token segments == one forward over each whole document.
    total = 0.0
    with torch.no_grad():
        for document in documents:
            ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(document)]])
            logits, _ = model(ids[:, :-1])
            total += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
    assert result.loss == pytest.approx(total / num_bytes, rel=1e-4)
    # Empty documents are skipped without shifting the bytes counted.
    with_empty = evaluate(model, [b"", *documents], tokenizer, 8, torch.device("cpu"))
    assert with_empty.loss == pytest.approx(result.loss) and with_empty.bits_per_byte == pytest.approx(
        result.bits_per_byte)
    with pytest.raises(ValueError, match="no non-empty documents"):
        evaluate(model, [b""], tokenizer, 8, torch.device("cpu"))


def test_metrics_csv_and_loss_plot_are_written(tmp_path, tiny_corpus):
    summary = Trainer(tiny_run(tmp_path / "a", steps=4, eval_every=2), corpus=tiny_corpus).train()
    series = read_metrics(summary["metrics_csv"])
    assert [step for step, _ in series[("train", "loss")]] == [1, 2, 3, 4]
    assert [step for step, _ in series[("val", "loss")]] == [2, 4]
    for name in ("lr", "tokens", "tokens_per_s", "peak_mem_mb", "skipped_steps"):
        assert len(series[("train", name)]) == 4, name
    for name in ("perplexity", "bpb"):
        assert len(series[("val", name)]) == 2, name
    assert open(summary["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    other = Trainer(tiny_run(tmp_path / "b", steps=2, eval_every=2,
                             ), corpus=tiny_corpus).train()
    both = plot_loss_curves({"a": summary["metrics_csv"], "b": other["metrics_csv"]}, tmp_path / "both.png")
    assert both.read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp.png"))


def test_attention_models_are_evaluated_in_sliding_windows_of_the_training_context():
    torch.manual_seed(0)
    model = LanguageModel(preset_config("llama", vocab_size=257, d_model=32, num_blocks=2, num_heads=2)).eval()
    tokenizer, context = ByteTokenizer(), 8
    document = b"for i in range(10):\n    print(i * i)\n"
    result = evaluate(model, [document], tokenizer, context_length=context, device=torch.device("cpu"))
    tokens = torch.tensor([tokenizer.eos_id, *tokenizer.encode(document)])
    stride, total = context // 2, 0.0
    with torch.no_grad():
        for target in range(1, tokens.numel()):  # each target's window, from the stride rule, one at a time
            end = min(((target - 1) // stride + 1) * stride, tokens.numel() - 1)
            begin = max(0, end - context)
            assert end - begin <= context and (begin == 0 or target - begin > stride)  # <= L keys, > L/2 seen
            logits, _ = model(tokens[None, begin:end])
            total += -torch.log_softmax(logits[0, target - 1 - begin], -1)[tokens[target]].item()
    assert result.loss == pytest.approx(total / (tokens.numel() - 1), rel=1e-5)
