"""Checkpoints: atomic writes (the `latest` pointer always names a complete checkpoint) and bit-identical resume."""

from __future__ import annotations

import pytest
import torch

from revival.data.tokenizers import load_tokenizer
from revival.models import from_pretrained
from revival.train import checkpoint as ckpt
from revival.train.trainer import Trainer

from .conftest import RECURRENT_MODEL, tiny_run

CHECKPOINT_FILES = {"config.json", "model.safetensors", "run.yaml", "trainer_state.pt", "revival_tokenizer.json"}


class Interrupted(Exception):
    pass


class StopAfterCheckpoint(Trainer):
    """A trainer that 'crashes' right after writing the checkpoint of step `stop_at`."""

    stop_at = 0

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.stop_at:
            raise Interrupted
        return path


def test_checkpoint_layout_latest_pointer_and_rotation(tmp_path, tiny_corpus):
    trainer = Trainer(tiny_run(tmp_path, steps=6, checkpoint_every=2, keep_checkpoints=2), corpus=tiny_corpus)
    trainer.train()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000006"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000006"]
    latest = ckpt.resolve_checkpoint(tmp_path)
    assert latest == root / "step-00000006"
    assert CHECKPOINT_FILES <= {p.name for p in latest.iterdir()}
    assert ckpt.resolve_checkpoint(root) == latest and ckpt.resolve_checkpoint(latest) == latest
    model = from_pretrained(latest)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert load_tokenizer(latest).kind == "byte"
    state = ckpt.load_trainer_state(latest)
    assert state["step"] == 6 and state["position"] == 6 * 4
    assert state["corpus"]["content_hash"] == tiny_corpus.content_hash
    with pytest.raises(FileNotFoundError, match="'.*nothing' does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        ckpt.resolve_checkpoint(tmp_path / "empty")


def test_crash_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_corpus, monkeypatch):
    trainer = Trainer(tiny_run(tmp_path, steps=4, checkpoint_every=2), corpus=tiny_corpus)
    saved = torch.save

    def crash_on_step_4(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError("disk full (simulated)")
        return saved(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_step_4)
    with pytest.raises(OSError, match="simulated"):
        trainer.train()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]  # no half-written leftovers
    latest = ckpt.resolve_checkpoint(tmp_path)
    assert ckpt.load_trainer_state(latest)["step"] == 2
    from_pretrained(latest)
    monkeypatch.setattr(ckpt.torch, "save", saved)
    resumed = Trainer(tiny_run(tmp_path, steps=4, checkpoint_every=2), resume=True, corpus=tiny_corpus)
    assert resumed.step == 2
    resumed.train()
    assert (root / "latest").read_text().strip() == "step-00000004"


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_bit_identical(tmp_path, tiny_corpus, grad_accum):
    n = 3
    settings = dict(steps=2 * n, checkpoint_every=n, grad_accum=grad_accum, lr=5e-3, warmup_steps=2)
    straight = Trainer(tiny_run(tmp_path / "straight", model=RECURRENT_MODEL, **settings), corpus=tiny_corpus)
    straight_losses = straight.train()["losses"]

    first = StopAfterCheckpoint(tiny_run(tmp_path / "resumed", model=RECURRENT_MODEL, **settings), corpus=tiny_corpus)
    first.stop_at = n
    first_losses = []
    step = first.train_step
    first.train_step = lambda: first_losses.append(step()) or first_losses[-1]
    with pytest.raises(Interrupted):
        first.train()
    torch.manual_seed(12345)  # a fresh process would start from another RNG state: resume must restore it
    second = Trainer(tiny_run(tmp_path / "resumed", model=RECURRENT_MODEL, **settings), resume=True,
                     corpus=tiny_corpus)
    assert second.step == n and second.position == n * 4 * grad_accum
    second_losses = second.train()["losses"]

    assert first_losses + second_losses == straight_losses  # exact float equality
    for name, value in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name
    for a, b in zip(straight.optimizer.state.values(), second.optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert straight.scheduler.get_last_lr() == second.scheduler.get_last_lr()
    assert straight.tokens_seen == second.tokens_seen


def test_resume_rejects_a_changed_corpus(tmp_path, tiny_corpus):
    from revival.data import make_corpus

    from .conftest import tiny_documents

    Trainer(tiny_run(tmp_path, steps=2, checkpoint_every=2), corpus=tiny_corpus).train()
    other = make_corpus("tiny", tiny_documents(13), validation_fraction=0.2, test_fraction=0.1)
    with pytest.raises(ValueError, match="corpus changed"):
        Trainer(tiny_run(tmp_path, steps=4), resume=True, corpus=other)


def test_saving_the_same_step_again_replaces_it_cleanly(tmp_path, tiny_corpus):
    trainer = Trainer(tiny_run(tmp_path, steps=2, checkpoint_every=2), corpus=tiny_corpus)
    trainer.train()
    with torch.no_grad():
        trainer.model.embedding.weight.add_(1.0)
    path = trainer.save_checkpoint()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]
    assert torch.equal(from_pretrained(path).embedding.weight, trainer.model.embedding.weight)
