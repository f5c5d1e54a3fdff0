"""`revival demo` pieces: parameter matching with the real model classes, model choice, and a tiny end-to-end run."""

from __future__ import annotations

import json

import pytest
import torch

from revival import demo
from revival.models import LanguageModel, preset_config


@pytest.mark.parametrize("preset", ["llama", "xlstm-large", "xlstm[7:1]"])
def test_match_parameters_within_5_percent(preset):
    target = demo.count_parameters("xlstm[1:0]", vocab_size=257, d_model=128, num_blocks=4, num_heads=4)
    options = demo.match_parameters(preset, target, {"num_heads": 4, "num_blocks": 4}, vocab_size=257)
    model = LanguageModel(preset_config(preset, **options))  # the real class, allocated
    assert abs(model.num_parameters() - target) <= 0.05 * target
    with pytest.raises(ValueError, match="cannot size"):
        demo.match_parameters(preset, 10, {"num_heads": 4, "num_blocks": 1}, vocab_size=257)


def test_count_parameters_on_meta_matches_a_real_model():
    options = {"vocab_size": 257, "d_model": 64, "num_blocks": 2, "num_heads": 4}
    assert demo.count_parameters("xlstm[1:1]", **options) == LanguageModel(
        preset_config("xlstm[1:1]", **options)).num_parameters()


def test_demo_models_must_include_an_xlstm():
    with pytest.raises(ValueError, match="the demo trains an xLSTM"):
        demo.demo_model_options(["llama"], 257)
    with pytest.raises(ValueError, match="distinct"):
        demo.demo_model_options(["xlstm", "xlstm"], 257)
    chosen = dict(demo.demo_model_options(["xlstm", "llama"], 257))
    assert chosen["xlstm"]["preset"].startswith("xlstm") and chosen["llama"]["preset"] == "llama"


def test_tiny_demo_end_to_end(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setitem(demo.DEMO_MODELS, "xlstm", {"preset": "xlstm[1:0]", "d_model": 32, "num_blocks": 2,
                                                    "num_heads": 2, "chunk_size": 8})
    monkeypatch.setitem(demo.DEMO_MODELS, "llama", {"preset": "llama", "d_model": 32, "num_blocks": 2,
                                                    "num_heads": 2})
    monkeypatch.setattr(demo, "CONTEXT_LENGTH", 16)
    monkeypatch.setattr(demo, "BATCH_SIZE", 4)
    monkeypatch.setattr(demo, "GENERATE_TOKENS", 12)
    monkeypatch.setattr(demo, "EVAL_MAX_TOKENS", 100)  # fewer than the validation documents hold
    printed = []
    results = demo.run_demo(["xlstm", "llama"], tokens=8 * 4 * 16, out_dir=tmp_path, progress=False,
                            corpus=tiny_corpus, print_fn=lambda *args: printed.append(" ".join(map(str, args))))
    xlstm, llama = results
    assert abs(llama["parameters"] - xlstm["parameters"]) <= 0.05 * xlstm["parameters"]
    assert xlstm["train_tokens"] == llama["train_tokens"] == 8 * 4 * 16
    for result in results:
        assert result["val_perplexity"] == pytest.approx(torch.tensor(result["val_loss"]).exp().item(), rel=1e-5)
        assert result["sample"].startswith("def ") and result["generate_tokens_per_s"] > 0
    assert xlstm["state_growth_per_token"] == 0 and llama["state_growth_per_token"] > 0  # constant state vs KV cache
    text = "\n".join(printed)
    for needle in ("parameters", "train tokens/s", "val loss", "val perplexity", "val bits/byte", "generate tokens/s",
                   "state bytes", "--- sample from xlstm", "--- sample from llama", str(tmp_path / "loss.png")):
        assert needle in text, needle
    header = next(line for line in printed if line.startswith("corpus "))  # says what it reads, and no more
    assert "until 100 tokens are reached (the last document read to its end" in header and xlstm["val_tokens"] > 100
    assert f"validation: {xlstm['val_tokens']:,} tokens;" in text
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["label"] == "xlstm"
    assert (tmp_path / "table.txt").read_text().startswith("model")
    assert (tmp_path / "xlstm" / "checkpoints" / "latest").is_file()
