"""The trainer on packed rows: `data.reset_at_documents` (default true) hands the packer's document starts to the
model, so a document's loss does not depend on the document before it in the row; validation reports both modes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from revival.data import ByteTokenizer
from revival.data.packing import PackedDataset
from revival.models import LanguageModel, preset_config
from revival.train.config import RunConfig
from revival.train.logging import read_metrics
from revival.train.trainer import Trainer

from .conftest import RECURRENT_MODEL, tiny_run


def _run(tmp_path, reset: bool | None, **train) -> RunConfig:
    run = tiny_run(tmp_path, model=RECURRENT_MODEL, **train).to_dict()
    if reset is not None:
        run["data"]["reset_at_documents"] = reset
    return RunConfig.from_dict(run)


def _spy(trainer):
    seen, forward = [], trainer.model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("document_starts"))
        return forward(*args, **kwargs)
    trainer.model.forward = spy
    return seen


def test_train_step_hands_the_packer_boundaries_to_the_model(tmp_path, tiny_corpus):
    assert RunConfig.from_dict({"model": {"preset": "llama"}}).data.reset_at_documents  # the default
    trainer = Trainer(_run(tmp_path / "reset", None), corpus=tiny_corpus)
    seen = _spy(trainer)
    expected = trainer.dataset.batch(0, trainer.cfg.batch_size).doc_start
    trainer.train_step()
    assert expected.any() and torch.equal(seen[0].cpu(), expected)

    trainer = Trainer(_run(tmp_path / "carried", False), corpus=tiny_corpus)
    seen = _spy(trainer)
    trainer.train_step()
    assert seen == [None]


def test_packed_loss_of_a_document_does_not_see_the_one_before():
    """Two packed rows that differ only in the first document: with resets, every target of the second document
    (from its leading separator on) has the same loss; carried across, they differ."""
    torch.manual_seed(0)
    model = LanguageModel(preset_config("xlstm[1:1]", vocab_size=257, d_model=32, num_blocks=2, num_heads=2,
                                        chunk_size=8)).double().eval()
    tokenizer = ByteTokenizer()
    second = b"def g(x):\n    return 2 * x\n"
    rows = [PackedDataset.from_documents([first, second], tokenizer, context_length=40, shuffle=False)
            for first in (b"import os\nprint(os.sep)\n", b"x = [i * i for i in ra]\n")]
    batches = [r.batch(0, 1) for r in rows]
    start = int(torch.nonzero(batches[0].doc_start[0])[1])  # the separator that begins the second document
    assert torch.equal(batches[0].doc_start, batches[1].doc_start)
    for reset in (True, False):
        losses = []
        for batch in batches:
            logits, _ = model(batch.input_ids, document_starts=batch.doc_start if reset else None)
            losses.append(F.cross_entropy(logits[0, start:], batch.targets[0, start:], reduction="none"))
        if reset:
            torch.testing.assert_close(losses[0], losses[1], atol=1e-10, rtol=0)
        else:
            assert (losses[0] - losses[1]).abs().max() > 1e-4


def test_validation_reports_both_modes(tmp_path, tiny_corpus):
    trainer = Trainer(_run(tmp_path, None, steps=2, eval_every=2), corpus=tiny_corpus)
    summary = trainer.train()
    series = read_metrics(summary["metrics_csv"])
    reset, carried = series[("val", "packed_loss_reset")], series[("val", "packed_loss_carried")]
    assert [step for step, _ in reset] == [2] and [step for step, _ in carried] == [2]
    assert reset[0][1] != carried[0][1]
