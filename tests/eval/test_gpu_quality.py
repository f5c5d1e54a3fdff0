"""benchmarks/gpu_quality.py --smoke on the CPU: the stages (LM, extrapolation, MQAR and parity by their recipes, every
parity seed) and the merge of runs with different --models into one gpu_quality.json."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_quality.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path):
    words = ["the", "king", "shall", "speak", "of", "honour", "and", "night", "my", "lord", "to", "be"]
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(words), (12_000,), generator=generator).tolist()
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(words[i] for i in picks))  # ~50 KB: 5 KB of validation text
    return path


@pytest.fixture
def one_thread():
    # the smoke's tiny ops lose most of their time to thread handoffs on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_runs_the_recipes_and_merges_per_model(tmp_path, corpus, one_thread):
    script = load_script()
    out = tmp_path / "study"
    base = ["--corpus", str(corpus), "--out", str(out), "--smoke"]
    assert script.main([*base, "--models", "mingru,llama", "--tree", "first"]) == 0
    first = json.loads((out / "gpu_quality.json").read_text())
    assert [r["model"] for r in first["results"]] == ["llama", "mingru"]  # the study's order, not the command's
    for result in first["results"]:
        assert "error" not in result, result.get("error")
        assert result["mqar"]["recipe"]["max_seconds"] == 75.0  # --mqar-seconds' default replaced the recipe's cap
        assert result["mqar"]["recipe"]["layer_options"] == {"d": {"num_heads": 2}}  # mqar_256_16.yaml's
        assert result["mqar"]["steps"] >= 1 and 0.0 <= result["mqar"]["accuracy"] <= 1.0
        parity = result["parity"]
        assert parity["recipe"]["curriculum"] == [12, 24] and parity["recipe"]["lrs"] == [0.01]  # the GPU recipe's
        assert [run["seed"] for run in parity["runs"]] == [0, 1]  # every seed reported
        assert [stage["max_length"] for stage in parity["runs"][0]["curriculum"]] == [12, 24, 40]
        assert set(parity["accuracy_by_seed"]) == {"0", "1"}
        assert {"lm_train", "mqar_run", "parity_seed0", "parity_seed1"} <= set(result["stage_seconds"])
    assert first["models"]["llama"]["tree"] == first["models"]["mingru"]["tree"] == "first"

    assert script.main([*base, "--models", "mingru", "--tree", "second", "--parity-seeds", "1"]) == 0
    second = json.loads((out / "gpu_quality.json").read_text())
    assert [r["model"] for r in second["results"]] == ["llama", "mingru"]
    assert second["results"][0] == first["results"][0]  # llama kept as it was
    assert second["models"]["llama"] == first["models"]["llama"]
    assert second["models"]["mingru"]["tree"] == "second"  # mingru replaced by the second run
    assert [run["seed"] for run in second["results"][1]["parity"]["runs"]] == [0]
    table = second["table"].splitlines()
    assert len(table) == 4 and table[2].startswith("| llama |") and table[3].startswith("| mingru |")
    assert "seed 1" in table[2] and "seed 1" not in table[3]  # the table is built from the merged entries
    assert not list(out.glob("*.tmp"))
    for name in ("gpu_quality.png", "gpu_quality_extrapolation.png"):  # drawn after each run, from the merged file
        (out / name).unlink()
    assert script.main(["--out", str(out), "--plot-only"]) == 0  # no corpus needed, nothing trained
    assert (out / "gpu_quality.png").stat().st_size > 0 and (out / "gpu_quality_extrapolation.png").stat().st_size > 0
    assert json.loads((out / "gpu_quality.json").read_text()) == second


@pytest.mark.parametrize("key, value", [("smoke", False), ("format", 1)])
def test_refuses_to_merge_into_a_different_study(tmp_path, corpus, capsys, key, value):
    script = load_script()
    out = tmp_path / "study"
    out.mkdir()
    other = {"format": script.FORMAT, "corpus": corpus.name, "corpus_bytes": corpus.stat().st_size, "smoke": True,
             "models": {}, "results": [], key: value}  # a real study, or one of the 7-second format
    (out / "gpu_quality.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        script.main(["--corpus", str(corpus), "--out", str(out), "--smoke", "--models", "llama"])
    assert f"written with {key} {value!r}" in capsys.readouterr().err
    assert json.loads((out / "gpu_quality.json").read_text()) == other
