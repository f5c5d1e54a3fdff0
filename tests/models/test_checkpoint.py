"""save_pretrained / from_pretrained: round trips, tied weights stored once, clear errors, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import revival
from revival import LanguageModel, ModelConfig, from_pretrained
from revival.models import checkpoint

VOCAB = 31


def make_model(pattern: str = "msxa", **overrides) -> LanguageModel:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=16, num_heads=2, pattern=pattern, chunk_size=8, **overrides)
    model = LanguageModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model = make_model(tie_embeddings=tie, logit_soft_cap=20.0)
    path = model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(path)
    assert loaded.config == model.config and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(IDS)[0], model(IDS)[0])
    assert LanguageModel.from_pretrained(path).num_parameters() == model.num_parameters()
    assert (loaded.lm_head.weight is loaded.embedding.weight) == tie
    stored = load_file(str(path / "model.safetensors"))
    assert ("lm_head.weight" in stored) != tie  # a tied head is stored once, as the embedding
    assert len(stored) == len({id(p) for p in model.parameters()}) + len(list(model.buffers()))


def test_dtype_is_kept_and_can_be_overridden(tmp_path):
    model = make_model("mx").double()
    model.save_pretrained(tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_type"] == "revival" and config["torch_dtype"] == "float64"
    assert config["revival_version"] == revival.__version__
    loaded = from_pretrained(tmp_path / "c")
    assert loaded.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(loaded(IDS)[0], model(IDS)[0])
    assert from_pretrained(tmp_path / "c", dtype="float32", device="cpu").dtype == torch.float32
    assert from_pretrained(tmp_path / "c", dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained(tmp_path / "c", dtype="float8")


def test_saving_over_an_existing_directory_keeps_other_files(tmp_path):
    target = tmp_path / "c"
    make_model("m").save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    model = make_model("x")
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert from_pretrained(target).config.pattern == "x"


def _rewrite_weights(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    path = make_model("ma").save_pretrained(tmp_path / "c")
    _rewrite_weights(path, lambda t: t.pop("blocks.1.mixer.q_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['blocks.1.mixer.q_proj.weight'\]"):
        from_pretrained(path)
    path = make_model("ma").save_pretrained(tmp_path / "d")
    _rewrite_weights(path, lambda t: t.update({"blocks.7.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['blocks.7.extra'\]"):
        from_pretrained(path)
    path = make_model("ma").save_pretrained(tmp_path / "e")
    _rewrite_weights(path, lambda t: t.update({"embedding.weight": torch.zeros(VOCAB + 1, 16)}))
    with pytest.raises(ValueError, match=r"mis-shaped tensors \[embedding.weight: expected \(31, 16\), got \(32, 16\)"):
        from_pretrained(path)


def test_bad_directories_and_configs(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        from_pretrained(tmp_path / "empty")
    path = make_model("m").save_pretrained(tmp_path / "c")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_layer'\]; valid keys"):
        from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        from_pretrained(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        from_pretrained(path)
    with pytest.raises(ValueError, match="format"):
        make_model("m").save_pretrained(tmp_path / "f", format="gguf")


class Boom(RuntimeError):
    pass


def _failing_save(tensors, filename, metadata=None):
    with open(filename, "wb") as f:  # half a file, then the failure
        f.write(b"\0" * 100)
    raise Boom("disk full")


def test_failed_save_leaves_no_half_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", _failing_save)
    with pytest.raises(Boom):
        make_model("m").save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_into_existing_directory_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = make_model("m")
    target = old.save_pretrained(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", _failing_save)
    with pytest.raises(Boom):
        make_model("x").save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(from_pretrained(target)(IDS)[0], old(IDS)[0])


def test_hf_format_round_trip_dispatches_to_the_hf_module(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(revival.preset_config("xlstm-large", vocab_size=VOCAB, d_model=128, num_heads=2,
                                                num_blocks=2)).eval()
    path = model.save_pretrained(tmp_path / "hf", format="hf")
    assert json.loads((path / "config.json").read_text())["model_type"] == "xlstm"
    loaded = from_pretrained(path)
    assert loaded.config.pattern == "xx"
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS)[0], model(IDS)[0], rtol=1e-5, atol=1e-5)


V1_OPTIONS = {"M": {"d_state": 64, "head_dim": 64, "chunk_size": 64, "bias": False},
              "d": {"num_heads": 4, "chunk_size": 64, "bias": False}, "g": {"chunk_size": 64, "bias": False},
              "s": {"silu_without_conv": True}}


def test_a_version_1_config_builds_the_layers_it_was_saved_with(tmp_path):
    """Before config_version 2, options left out of layer_options took the layers' own defaults, and an sLSTM block
    without a conv fed SiLU(x) to its gates; such a checkpoint loads and computes what it computed then."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, d_model=64, num_heads=2, pattern="Mdgs", chunk_size=8,
                         slstm_conv_kernel=0, layer_options=V1_OPTIONS)
    model = LanguageModel(config).eval()
    path = model.save_pretrained(tmp_path / "v1")
    raw = json.loads((path / "config.json").read_text())
    assert raw["config_version"] == 2
    del raw["config_version"]
    raw["layer_options"] = {}  # what version 1 wrote for this model
    (path / "config.json").write_text(json.dumps(raw))
    loaded = from_pretrained(path)
    assert loaded.config.layer_options == V1_OPTIONS
    with torch.no_grad():
        assert torch.equal(loaded(IDS)[0], model(IDS)[0])
    # the same numbers under version 2 are a different model (sizes derived from the model's fields)
    assert LanguageModel(ModelConfig.from_dict({**config.to_dict(), "layer_options": {}})).num_parameters() != \
        model.num_parameters()


def test_a_newer_config_version_is_refused_by_name(tmp_path):
    path = make_model("m").save_pretrained(tmp_path / "c")
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "config_version": 99}))
    with pytest.raises(ValueError, match="config_version: 99 is not supported"):
        from_pretrained(path)
