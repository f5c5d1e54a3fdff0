"""The `revival` command end to end, through a real subprocess: train, resume, eval, generate, --help, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
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
    if not command:  # through the real command (test_train_resume_eval_generate runs `revival train` for real)
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


# ------------------------------------------------------------------------------------------------- the user's path
def run_main(argv, cwd: Path, capsys) -> tuple[int, str, str]:
    """`revival ARGV` in this process, from `cwd`: (exit status, stdout, stderr)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        status = main([str(a) for a in argv])
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_error(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"revival {command}: error: "), err
    return lines[0]


def write_config(workdir: Path, name: str, **train) -> Path:
    config = yaml.safe_load((workdir / "tiny.yaml").read_text())
    config["train"].update(out_dir=str(workdir / name), **train)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_run_folder_that_exists_needs_resume_or_overwrite(workdir, capsys):
    config = write_config(workdir, "again", keep_checkpoints=2)
    assert run_main(["train", "--config", config, "--no-progress"], workdir, capsys)[0] == 0
    status, _, err = run_main(["train", "--config", config, "train.steps=2", "--no-progress"], workdir, capsys)
    assert status == 2 and "holds an earlier run" in one_line_error(err, "train") and "--overwrite" in err
    status, out, _ = run_main(["train", "--config", config, "train.steps=2", "--overwrite", "--no-progress"], workdir,
                              capsys)
    assert status == 0 and "overwrite: removed the earlier run's" in out
    run = workdir / "again"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]
    steps = [int(row.split(",")[0]) for row in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and max(steps) == 2  # one run's rows, not two appended


def test_resume_with_a_changed_model_or_finished_steps_is_one_line_and_train_changes_are_said(workdir, capsys):
    config = write_config(workdir, "resumable", checkpoint_every=2)
    assert run_main(["train", "--config", config, "--no-progress"], workdir, capsys)[0] == 0
    status, _, err = run_main(["train", "--config", config, "--resume", "model.d_model=64"], workdir, capsys)
    assert status == 2 and "the model section differs" in one_line_error(err, "train")
    assert "d_model: 32 in the checkpoint, 64 now" in err
    status, _, err = run_main(["train", "--config", config, "--resume", "train.steps=3"], workdir, capsys)
    assert status == 2 and "is at step 4 already" in one_line_error(err, "train")
    status, out, _ = run_main(["train", "--config", config, "--resume", "train.steps=6", "train.lr=0.002",
                               "--no-progress"], workdir, capsys)
    assert status == 0 and "resume: train.lr changed from 0.01 to 0.002" in out and "nan" not in out
    assert "resume: train.steps changed from 4 to 6" in out


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "header":
        path.write_bytes(b"\xff" * 8 + bytes(data[8:]))
    else:  # random bytes over the tensor data (after the JSON header)
        header = 8 + int.from_bytes(data[:8], "little")
        generator = torch.Generator().manual_seed(0)
        noise = torch.randint(0, 256, (len(data) - header,), generator=generator, dtype=torch.uint8)
        path.write_bytes(bytes(data[:header]) + bytes(noise.tolist()))


@pytest.mark.parametrize("how", ["truncated", "header", "data"])
def test_a_corrupt_checkpoint_is_one_line_for_eval_and_generate(workdir, trained, tmp_path, capsys, how):
    import shutil

    latest = workdir / "run" / "checkpoints" / (workdir / "run" / "checkpoints" / "latest").read_text().strip()
    broken = tmp_path / "broken"
    shutil.copytree(latest, broken)
    _corrupt(broken / "model.safetensors", how)
    for argv in (["eval", broken, "--no-progress"], ["generate", broken, "--prompt", "x", "--max-new-tokens", "2"]):
        status, _, err = run_main(argv, workdir, capsys)
        line = one_line_error(err, argv[0])
        assert status == 2 and "model.safetensors" in line and ("corrupt" in line), line


def test_a_gpu_sized_config_on_cpu_stops_before_loading_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REVIVAL_CACHE", str(tmp_path / "cache"))
    status, _, err = run_main(["train", "--config", ROOT / "configs" / "xlstm-125m.yaml", "train.device=cpu",
                               f"train.out_dir={tmp_path / 'big'}"], tmp_path, capsys)
    line = one_line_error(err, "train")
    assert status == 2 and "GPU-sized" in line and "GiB" in line and "--force" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "big").exists()  # no corpus built, nothing written


def test_a_binary_file_is_not_a_corpus(workdir, tmp_path, capsys):
    binary = tmp_path / "program"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    config = write_config(workdir, "binary")
    status, _, err = run_main(["train", "--config", config, f"data.corpus={binary}"], workdir, capsys)
    assert status == 2 and "not a text file" in one_line_error(err, "train")


def test_save_pretrained_with_the_tokenizer_then_generate(tmp_path, capsys):
    from revival.data import ByteTokenizer
    from revival.models import LanguageModel, preset_config

    model = LanguageModel(preset_config("llama", vocab_size=257, d_model=32, num_blocks=1, num_heads=2))
    model.save_pretrained(tmp_path / "bare")
    status, _, err = run_main(["generate", tmp_path / "bare", "--prompt", "x"], tmp_path, capsys)
    assert status == 2 and "tokenizer=tokenizer" in one_line_error(err, "generate")
    model.save_pretrained(tmp_path / "my-model", tokenizer=ByteTokenizer())
    status, out, _ = run_main(["generate", "my-model", "--prompt", "def ", "--max-new-tokens", "4", "--no-stop"],
                              tmp_path, capsys)
    assert status == 0 and out.startswith("def ")


def test_eval_and_the_training_log_say_what_they_read(workdir, capsys):
    config = write_config(workdir, "scoped", steps=3, log_every=1, eval_every=3)
    status, out, _ = run_main(["train", "--config", config, "--no-progress"], workdir, capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("step 1/3: loss ")  # --no-progress still logs, before the first evaluation
    assert re.search(r"val loss .* \(\d+ tokens: 1 of 1 validation documents, whole, until train.eval_max_tokens; "
                     r"`revival eval` reads them all\)", out), out
    status, out, _ = run_main(["eval", workdir / "scoped", "--no-progress"], workdir, capsys)
    assert status == 0 and "documents, whole)" in out


def test_device_errors_name_the_option_and_warmup_beyond_steps_warns(workdir, trained, capsys):
    if not torch.cuda.is_available():
        status, _, err = run_main(["generate", "run", "--prompt", "x", "--device", "cuda"], workdir, capsys)
        assert status == 2 and one_line_error(err, "generate").startswith("revival generate: error: --device:")
    status, _, err = run_main(["eval", "run", "--device", "gpu"], workdir, capsys)
    assert status == 2 and "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'" in err
    config = write_config(workdir, "warm", steps=2, warmup_steps=5)
    status, out, _ = run_main(["train", "--config", config, "--no-progress"], workdir, capsys)
    assert status == 0 and "warning: train.warmup_steps (5) > train.steps (2)" in out


def test_user_errors_are_one_line_bugs_keep_their_traceback_and_debug_shows_both(tmp_path, capsys, monkeypatch):
    status, _, err = run_main(["train", "--config", "missing.yaml"], tmp_path, capsys)
    assert status == 2 and "Traceback" not in err
    for argv in (["--debug", "train", "--config", "missing.yaml"], ["train", "--config", "missing.yaml", "--debug"]):
        status, _, err = run_main(argv, tmp_path, capsys)
        assert status == 2 and "Traceback" in err and err.strip().endswith("config: no such file 'missing.yaml'")
    monkeypatch.setenv("REVIVAL_DEBUG", "1")
    status, _, err = run_main(["train", "--config", "missing.yaml"], tmp_path, capsys)
    assert status == 2 and "Traceback" in err
    monkeypatch.delenv("REVIVAL_DEBUG")

    import revival.train.config

    def a_bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # a library bug: a plain ValueError, not a UserError

    monkeypatch.setattr(revival.train.config, "load_run_config", a_bug)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["train", "--config", "x.yaml"])


def test_bench_defaults_write_under_runs_and_tiny_is_small(tmp_path, capsys, monkeypatch):
    import revival.bench.studies

    calls = []

    def fake_study(name, **kwargs):
        calls.append(kwargs)
        return {"points": [], "plot": f"bench_{name}.png"}

    monkeypatch.setattr(revival.bench.studies, "run_study", fake_study)
    assert run_main(["bench", "train", "--size", "tiny"], tmp_path, capsys)[0] == 0
    tiny = calls[-1]
    assert tiny["out_dir"] == "runs/bench" and tiny["anchors"] is False
    assert len(tiny["presets"]) <= 2 and max(tiny["contexts"]) <= 256
    assert run_main(["bench", "decode", "--size", "125m"], tmp_path, capsys)[0] == 0
    assert calls[-1]["out_dir"] == "runs/bench" and calls[-1]["anchors"] is True
    assert run_main(["bench", "train", "--size", "tiny", "--anchors"], tmp_path, capsys)[0] == 0
    assert calls[-1]["anchors"] is True


def test_python_dash_m_revival_and_the_license(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "revival", "--version"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("revival ")
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
