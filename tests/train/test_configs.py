"""Every YAML config in configs/ loads, builds its model config, states its true parameter count and a run command
that the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from revival.demo import count_parameters
from revival.train.config import load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
STATED = re.compile(r"^# parameters: ([\d,]+)", re.MULTILINE)
RUN_LINE = re.compile(r"^# run: (revival train [^(\n]*)", re.MULTILINE)


def test_there_are_cpu_and_gpu_configs_for_the_presets():
    names = {path.stem for path in CONFIGS}
    assert {"xlstm-tiny", "llama-tiny", "xlstm-large-tiny", "xlstm-125m", "llama-125m", "xlstm-large-125m"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_loads_and_builds_its_model(path):
    run = load_run_config(path)
    vocab_size = 257 if run.data.tokenizer == "byte" else run.data.bpe_vocab_size
    config = run.model_config(vocab_size=vocab_size)
    assert config.vocab_size == vocab_size
    stated = STATED.search(path.read_text())
    assert stated, f"{path.name}: no '# parameters: N' comment"
    options = {k: v for k, v in run.model.items() if k != "preset"}  # the count tells the truth (on the meta device)
    assert count_parameters(run.model["preset"], vocab_size=vocab_size, **options) == int(
        stated.group(1).replace(",", ""))
    if path.stem.endswith("125m"):
        assert stated and 110e6 <= int(stated.group(1).replace(",", "")) <= 140e6


@pytest.mark.parametrize("path", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_states_a_run_command_the_cli_accepts(path):
    from revival.cli import build_parser

    line = RUN_LINE.search(path.read_text())
    assert line, f"{path.name}: no '# run: revival train ...' comment"
    argv = shlex.split(line.group(1))[1:]
    args = build_parser().parse_args(argv)
    assert args.command == "train" and args.config == f"configs/{path.name}" and args.overrides == []


def test_docs_config_table_lists_every_config_with_its_parameter_count():
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    rows = dict(re.findall(r"^\| `([\w.-]+)` \|[^|\n]*\| ([\d,]+) \|", docs, re.MULTILINE))
    stated = {path.stem: STATED.search(path.read_text()).group(1) for path in CONFIGS}  # true: checked above
    assert rows == stated
