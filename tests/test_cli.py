"""The `revival` command end to end, through a real subprocess: train, resume, eval, generate, --help, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from revival.cli import main

ROOT = Path(__file__).resolve().parents[1]


def revival(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "revival.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def write_corpus(folder: Path) -> Path:
    folder.mkdir()
    for i in range(8):
        body = "".join(f"def f{j}(x):\n    return x * {j}\n\n" for j in range(i, i + 5))
        (folder / f"mod{i}.py").write_text(body)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(work / "corpus")
    config = {"model": {"preset": "llama", "d_model": 32, "num_blocks": 2, "num_heads": 2},
              "data": {"corpus": str(corpus), "tokenizer": "byte", "context_length": 16},
              "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2,
                        "eval_docs": 2, "checkpoint_every": 2, "log_every": 1, "device": "cpu",
                        "tensorboard": False, "out_dir": str(work / "run")}}
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    return work


@pytest.fixture(scope="module")
def trained(workdir) -> subprocess.CompletedProcess:
    """`revival train` on the tiny config (4 steps, checkpoints at 2 and 4)."""
    return revival("train", "--config", "tiny.yaml", "--no-progress", cwd=workdir)


def test_train_resume_eval_generate(workdir, trained):
    result = trained
    assert result.returncode == 0, result.stderr
    assert "done: 4 steps" in result.stdout and "validation: loss" in result.stdout
    run = workdir / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert (run / "metrics.csv").is_file() and (run / "loss.png").is_file()

    result = revival("train", "--config", "tiny.yaml", "train.steps=6", "--resume", "--no-progress", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "done: 6 steps" in result.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"

    result = revival("eval", "run", "--split", "test", "--no-progress", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout and "bits/byte" in result.stdout and "split test" in result.stdout

    result = revival("generate", "run", "--prompt", "def ", "--max-new-tokens", "24", "--seed", "1", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ") and "tokens/s" in result.stderr
    streamed = revival("generate", str(run / "checkpoints" / "step-00000006"), "--prompt", "def ",
                       "--max-new-tokens", "24", "--seed", "1", "--stream", cwd=workdir)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == result.stdout  # same seed: streaming prints the same text


@pytest.mark.parametrize("command, expected", [
    ([], ["train", "eval", "generate", "demo", "bench"]),
    (["train"], ["--config", "--resume", "SECTION.KEY=VALUE"]),
    (["eval"], ["CHECKPOINT", "--split", "--corpus"]),
    (["generate"], ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                    "--seed", "--stream"]),
    (["demo"], ["--models", "--minutes"]),
    (["bench"], ["train,prefill,decode", "--presets", "--contexts", "--size", "--out"]),
])
def test_help(tmp_path, capsys, command, expected):
    if len(command) == 0 or command == ["train"]:  # through the real command
        result = revival(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        text = result.stdout
    else:  # the same parser in-process (saves a torch import per command)
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
    assert text.startswith(f"usage: revival {' '.join(command)}".rstrip())
    for needle in expected:
        assert needle in text, needle


def test_bad_config_exits_2_with_one_clear_line(workdir):
    bad = yaml.safe_load((workdir / "tiny.yaml").read_text())
    bad["train"]["learning_rate"] = 0.1
    (workdir / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = revival("train", "--config", "bad.yaml", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip()] and "train: unknown key(s) ['learning_rate']; valid keys:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "missing.yaml"], "config: no such file"),
    (["train", "--config", "tiny.yaml", "train.steps"], "override: expected SECTION.KEY=VALUE"),
    (["train", "--config", "tiny.yaml", "data.tokenizer=words"], "data.tokenizer: expected one of ['byte', 'bpe']"),
    (["eval", "nowhere"], "checkpoint: 'nowhere' does not exist"),
    (["generate", "nowhere", "--prompt", "x"], "checkpoint: 'nowhere' does not exist"),
    (["eval", "corpus"], "is neither a run directory"),
    (["train"], "--config: expected a run config FILE.yaml"),
    (["train", "tiny.yaml"], "write `revival train --config tiny.yaml`"),
    (["generate", "run", "--prompt", "x", "--top-p", "1.5"], "top_p: expected None or a number in (0, 1]"),
    (["demo", "--models", "llama"], "the demo trains an xLSTM"),
])
def test_bad_arguments_exit_2(workdir, trained, capsys, argv, message):
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert err.startswith(f"revival {argv[0]}: error: ") and message in err


def test_argparse_errors_exit_2(capsys):
    for argv in (["generate", "run"], ["eval", "run", "--split", "train"], ["bench"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "usage: revival" in capsys.readouterr().err


def test_generate_reads_a_model_directory_with_a_hugging_face_tokenizer(tmp_path, capsys):
    from revival.data import train_bpe
    from revival.models import LanguageModel, preset_config

    documents = [f"def f{i}(x):\n    return x + {i}\n".encode() for i in range(40)]
    tokenizer = train_bpe(documents, vocab_size=300)
    model = LanguageModel(preset_config("xlstm[1:0]", vocab_size=tokenizer.vocab_size, d_model=32, num_blocks=1,
                                        num_heads=2, chunk_size=8))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save(tmp_path / "model")
    (tmp_path / "model" / "revival_tokenizer.json").unlink()  # a Hub-style folder: tokenizer.json alone
    assert main(["generate", str(tmp_path / "model"), "--prompt", "def f", "--max-new-tokens", "8",
                 "--temperature", "0", "--no-stop"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f") and "[8 tokens in" in out.err


def test_eval_on_the_stdlib_corpus(workdir, trained, capsys):
    """The one test that loads the embedded corpus (the Python standard library's sources)."""
    assert main(["eval", str(workdir / "run"), "--corpus", "stdlib", "--max-docs", "1", "--context-length", "256",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "corpus: stdlib" in out and "perplexity" in out
