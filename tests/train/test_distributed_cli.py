"""`revival train --nproc 2` end to end (torchrun, 2 gloo processes on CPU), and its error without train.parallel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from revival.cli import main
from revival.errors import UserError
from revival.train import distributed
from tests.train.conftest import RECURRENT_MODEL, tiny_documents

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 180


def write_config(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in tiny_documents():
        (corpus / name).write_bytes(text)
    config = {"model": RECURRENT_MODEL,
              "data": {"corpus": str(corpus), "tokenizer": "byte", "context_length": 16, "validation_fraction": 0.2},
              "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_docs": 1, "eval_max_tokens": 64,
                        "log_every": 1, "device": "cpu", "tensorboard": False, "out_dir": str(tmp_path / "run")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_nproc_trains_in_two_processes_and_reports_once(tmp_path):
    config = write_config(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "revival", "train", "--config", str(config), "train.parallel=fsdp",
                           "--nproc", "2", "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("done: 2 steps") == 1  # rank 0 reports; rank 1 is silent
    assert "128 tokens" in done.stdout  # 2 steps x 2 ranks x batch 2 x 16 tokens: all ranks' tokens counted
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    assert (checkpoint / distributed.DCP_DIR / ".metadata").is_file()
    assert (checkpoint / "model.safetensors").is_file()
    assert (tmp_path / "run" / "metrics.csv").read_text().count("train,loss") == 2  # one writer


def test_nproc_without_parallel_is_one_line_error(tmp_path, capsys):
    config = write_config(tmp_path)
    assert main(["train", "--config", str(config), "--nproc", "2"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("revival train: error: --nproc: 2 processes need train.parallel=ddp or train.parallel=fsdp, "
                     "got 'none'")
    assert not (tmp_path / "run").exists()


def test_parallel_none_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="train.parallel: 'none' in a launch of 2 processes"):
        distributed.init_world("none", "cpu")


def test_torchrun_command_runs_the_cli_module():
    command = distributed.torchrun_command(4, ["train", "--config", "x.yaml"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "revival.cli",
                           "train", "--config", "x.yaml"]
