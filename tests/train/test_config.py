"""Run config: YAML + overrides, unknown sections/keys listed, bad values rejected with the valid choices."""

from __future__ import annotations

import pytest
import yaml

from revival.train.config import RunConfig, load_run_config, parse_override


def write(tmp_path, raw) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


BASE = {"model": {"preset": "llama", "d_model": 64, "num_blocks": 2}, "data": {"tokenizer": "byte"},
        "train": {"steps": 10}}


def test_defaults_and_overrides(tmp_path):
    run = load_run_config(write(tmp_path, BASE), ["train.lr=3e-4", "train.tensorboard=false", "data.context_length=64",
                                                  "model.num_heads=4"])
    assert run.train.lr == pytest.approx(3e-4) and isinstance(run.train.lr, float)
    assert run.train.tensorboard is False
    assert run.data.context_length == 64
    assert run.model == {"preset": "llama", "d_model": 64, "num_blocks": 2, "num_heads": 4}
    assert run.train.batch_size == 16  # default kept
    assert run.model_config(vocab_size=257).vocab_size == 257
    again = RunConfig.from_dict(run.to_dict())
    assert again.to_dict() == run.to_dict()


def test_default_config_without_file():
    run = load_run_config(None, ["train.steps=3"])
    assert run.train.steps == 3 and run.model["preset"] == "xlstm[7:1]"


@pytest.mark.parametrize("raw, message", [
    ({**BASE, "optimizer": {}}, "unknown section(s) ['optimizer']; valid: ['data', 'model', 'train']"),
    ({**BASE, "train": {"stepz": 3}}, "train: unknown key(s) ['stepz']; valid keys: ["),
    ({**BASE, "data": {"tokeniser": "byte"}}, "data: unknown key(s) ['tokeniser']"),
    ({**BASE, "data": {"tokenizer": "wordpiece"}}, "data.tokenizer: expected one of ['byte', 'bpe']"),
    ({**BASE, "train": {"precision": "fp8"}}, "train.precision: expected one of ['auto', 'fp32', 'bf16']"),
    ({**BASE, "train": {"steps": 0}}, "train.steps: expected a positive integer, got 0"),
    ({**BASE, "train": {"steps": 2.5}}, "train.steps: expected int, got 2.5"),
    ({**BASE, "train": {"lr": "fast"}}, "train.lr: expected float, got 'fast'"),
    ({**BASE, "train": {"lr": -1}}, "train.lr: expected a positive number"),
    ({**BASE, "train": {"min_lr_ratio": 2}}, "train.min_lr_ratio: expected a number in [0, 1]"),
    ({**BASE, "train": {"tensorboard": "maybe"}}, "train.tensorboard: expected true or false"),
    ({"model": {"d_model": 64}}, "model.preset: missing"),
    ({"model": {"preset": "gpt5"}}, "model: name: unknown preset 'gpt5'; valid presets:"),
    ({"model": {"preset": "llama", "widht": 3}}, "model: overrides: unknown key(s) ['widht']; valid keys:"),
    ({"model": {"preset": "llama", "d_model": 64, "num_heads": 5}}, "num_heads: 5 does not divide d_model=64"),
])
def test_bad_configs_are_rejected(tmp_path, raw, message):
    with pytest.raises(ValueError) as error:
        load_run_config(write(tmp_path, raw))
    assert message in str(error.value)


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_run_config(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_run_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text, expected", [("train.lr=0.001", (["train", "lr"], 0.001)),
                                            ("model.preset=xlstm[7:1]", (["model", "preset"], "xlstm[7:1]")),
                                            ("train.out_dir=runs/a=b", (["train", "out_dir"], "runs/a=b")),
                                            ("train.progress=no", (["train", "progress"], False))])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.lr", "lr=3", "a.b.c=1", ".lr=1"])
def test_bad_override(text):
    with pytest.raises(ValueError, match="override: expected SECTION.KEY=VALUE"):
        parse_override(text)


def test_override_of_unknown_section_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown section"):
        load_run_config(write(tmp_path, BASE), ["optim.lr=1"])
