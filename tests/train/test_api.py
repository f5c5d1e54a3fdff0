"""The public Python training API and what HF / nanoGPT users reach for: forward(labels=), activation checkpointing,
revival.train.train / Trainer, init_from (fine-tuning), data.text_field and split fractions, resume details."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from revival.data import ByteTokenizer, load_tokenizer
from revival.errors import UserError
from revival.models import LanguageModel, from_pretrained, preset_config
from revival.train import RunConfig, Trainer, train
from revival.train.logging import read_metrics

from .conftest import tiny_run


def small_model(preset="xlstm[1:1]", **options) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(preset_config(preset, vocab_size=40, d_model=16, num_blocks=2, num_heads=2, chunk_size=8,
                                       **options))


def test_forward_with_labels_returns_the_shifted_loss_and_ignores_minus_100():
    model = small_model()
    ids = torch.randint(0, 40, (2, 9))
    logits, state = model(ids)  # existing callers: two values
    logits_l, state_l, loss = model(ids, labels=ids)
    assert torch.equal(logits, logits_l) and len(state_l) == len(state)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)
    labels = ids.clone()
    labels[:, 5:] = -100
    _, _, partial = model(ids, labels=labels)
    torch.testing.assert_close(partial, F.cross_entropy(logits[:, :4].flatten(0, 1), ids[:, 1:5].flatten()))
    with pytest.raises(ValueError, match="labels: expected a tensor shaped like input_ids"):
        model(ids, labels=ids[:, :3])


def test_token_ids_beyond_the_vocabulary_are_a_clear_error():
    model = small_model()
    with pytest.raises(UserError, match=r"input_ids: token ids must lie in \[0, 40\), got min 0, max 40"):
        model(torch.tensor([[0, 40]]))


@pytest.mark.parametrize("preset", ["xlstm[1:1]", "llama"])
def test_activation_checkpointing_gives_the_same_gradients_in_float64(preset):
    model = small_model(preset).double()
    ids = torch.randint(0, 40, (2, 8))
    grads = []
    for enabled in (False, True):
        model.set_activation_checkpointing(enabled)
        model.zero_grad()
        calls = []
        forward = model.blocks[0].forward

        def counted(*args, calls=calls, forward=forward, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        model.blocks[0].forward = counted
        model.train()
        model(ids, labels=ids)[2].backward()
        del model.blocks[0].forward
        assert len(calls) == (2 if enabled else 1)  # recomputed in backward
        grads.append([p.grad.clone() for p in model.parameters()])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=1e-12, atol=1e-12)


def test_train_from_a_dict_and_the_activation_checkpointing_key(tmp_path, tiny_corpus):
    run = tiny_run(tmp_path / "a", steps=3)
    summary = train(run.to_dict(), corpus=tiny_corpus)
    assert summary["step"] == 3
    checkpointed = Trainer(tiny_run(tmp_path / "b", steps=3, activation_checkpointing=True), corpus=tiny_corpus)
    assert checkpointed.model.activation_checkpointing
    assert checkpointed.train()["losses"] == pytest.approx(summary["losses"], rel=1e-5)


def test_init_from_fine_tunes_a_saved_model_with_its_tokenizer(tmp_path, tiny_corpus):
    first = Trainer(tiny_run(tmp_path / "base", steps=12), corpus=tiny_corpus)
    first.train()
    first.model.save_pretrained(tmp_path / "saved", tokenizer=first.tokenizer)
    assert load_tokenizer(tmp_path / "saved").kind == "byte"
    run = RunConfig.from_dict({"model": {"init_from": str(tmp_path / "saved"), "dropout": 0.0},
                               "data": {"context_length": 16},
                               "train": {**tiny_run(tmp_path / "tuned").to_dict()["train"], "steps": 2}})
    tuned = Trainer(run, corpus=tiny_corpus)
    for name, value in from_pretrained(tmp_path / "saved").state_dict().items():
        assert torch.equal(tuned.model.state_dict()[name], value), name
    fresh = Trainer(tiny_run(tmp_path / "fresh", steps=2), corpus=tiny_corpus)
    assert tuned.train()["losses"][0] < 0.8 * fresh.train()["losses"][0]  # starts where the base model got to
    with pytest.raises(UserError, match="expected one of model.preset"):
        RunConfig.from_dict({"model": {"init_from": str(tmp_path / "saved"), "preset": "llama"}})
    with pytest.raises(UserError, match="model.init_from: .* does not exist"):
        RunConfig.from_dict({"model": {"init_from": str(tmp_path / "nowhere")}})
    bad = RunConfig.from_dict({"model": {"init_from": str(tmp_path / "saved"), "d_model": 64},
                               "train": {"out_dir": str(tmp_path / "bad"), "device": "cpu", "progress": False}})
    with pytest.raises(UserError, match="keep every weight's shape"):
        Trainer(bad, corpus=tiny_corpus)


def test_text_field_and_split_fractions_are_configurable(tmp_path):
    corpus_file = tmp_path / "docs.jsonl"
    corpus_file.write_text("".join(json.dumps({"body": f"def f{i}(x):\n    return x + {i}\n" * 3}) + "\n"
                                   for i in range(40)))
    settings = tiny_run(tmp_path / "run", steps=1).to_dict()
    settings["data"].update(corpus=str(corpus_file), text_field="body", validation_fraction=0.25, test_fraction=0.25)
    trainer = Trainer(RunConfig.from_dict(settings))
    counts = [len(trainer.corpus.split(s)) for s in ("train", "validation", "test")]
    assert sum(counts) == 40 and counts[1] >= 5 and counts[2] >= 5  # about 10 each, not 1% (at least 1)
    settings["data"].update(corpus="stdlib")
    with pytest.raises(UserError, match="applies to corpora read from a path"):
        Trainer(RunConfig.from_dict({**settings, "train": {**settings["train"], "out_dir": str(tmp_path / "s")}}))
    with pytest.raises(UserError, match="data.validation_fraction: expected a fraction"):
        RunConfig.from_dict({**settings, "data": {**settings["data"], "validation_fraction": 1.5}})


def test_resume_applies_a_new_learning_rate_and_drops_rows_logged_after_the_checkpoint(tmp_path, tiny_corpus):
    Trainer(tiny_run(tmp_path, steps=4, checkpoint_every=2, lr=1e-2, warmup_steps=1), corpus=tiny_corpus).train()
    (tmp_path / "checkpoints" / "latest").write_text("step-00000002\n")  # as if it had stopped after step 2's save
    resumed = Trainer(tiny_run(tmp_path, steps=4, checkpoint_every=2, lr=1e-3, warmup_steps=1), resume=True,
                      corpus=tiny_corpus)
    assert resumed.scheduler.base_lrs == [1e-3, 1e-3]
    from revival.train.schedule import warmup_cosine

    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * warmup_cosine(2, 1, 4, 0.1))
    resumed.train()
    steps = [step for step, _ in read_metrics(tmp_path / "metrics.csv")[("train", "loss")]]
    assert steps == [1, 2, 3, 4]  # rows 3 and 4 of the first run were dropped, then written again


def test_the_newest_checkpoints_are_kept_even_next_to_a_later_step(tmp_path, tiny_corpus):
    from revival.train import checkpoint as ckpt

    trainer = Trainer(tiny_run(tmp_path, steps=2, checkpoint_every=1, keep_checkpoints=1), corpus=tiny_corpus)
    trainer.train()
    trainer.step = 1  # a checkpoint of an earlier step written after a later one (a mixed folder)
    path = trainer.save_checkpoint()
    assert ckpt.resolve_checkpoint(tmp_path) == path and path.is_dir()


def test_tensorboard_missing_is_said(tmp_path, monkeypatch):
    import sys

    from revival.train.logging import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    printed = []
    MetricsLogger(tmp_path, tensorboard=True, print_fn=printed.append).close()
    assert printed and "tensorboard package is not installed" in printed[0]


def test_save_pretrained_writes_the_tokenizer(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
    assert load_tokenizer(tmp_path / "m").kind == "byte"
    model.save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())  # into an existing directory too
    assert (tmp_path / "m" / "revival_tokenizer.json").is_file()
