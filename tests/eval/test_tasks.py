"""Synthetic tasks: the generators against independent references, seeding, one learnable run, `revival eval task`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from revival.cli import main
from revival.data.tasks import IGNORE, bracket_matching, generate, modular_arithmetic, mqar, parity, selective_copying
from revival.errors import UserError
from revival.eval.tasks import RECIPES, TaskRecipe, accuracy, load_recipe, recipe, run_task, task_model_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("task", ["mqar", "parity", "modular_arithmetic", "bracket_matching", "selective_copying"])
def test_same_seed_same_data_other_seed_other_data(task):
    arguments = RECIPES[task]["tiny"]["train_data"] | dict(RECIPES[task]["tiny"].get("settings", ({},))[0])
    arguments["num_examples"] = 50
    first, again = generate(task, **arguments), generate(task, **arguments)
    other = generate(task, **{**arguments, "seed": arguments["seed"] + 1})
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)
    assert int(first.inputs.max()) < first.vocab_size and int(first.targets.max()) < first.vocab_size


def test_mqar_queries_ask_for_the_value_stored_with_their_key():
    data = mqar(vocab_size=64, seq_len=32, num_kv_pairs=4, num_examples=40, seed=3)
    for inputs, targets in zip(data.inputs.tolist(), data.targets.tolist()):
        pairs = dict(zip(inputs[0:8:2], inputs[1:8:2]))
        assert len(pairs) == 4 and all(1 <= k < 32 for k in pairs) and all(32 <= v < 64 for v in pairs.values())
        scored = [t for t, target in enumerate(targets) if target != IGNORE]
        assert len(scored) == 4 and all(t >= 8 and t % 2 == 0 for t in scored)
        assert sorted(inputs[t] for t in scored) == sorted(pairs)
        assert all(targets[t] == pairs[inputs[t]] for t in scored)
        assert all(inputs[t] == 0 for t in range(8, 32) if t not in scored)


def _answers(data):
    """(symbols before QUERY, answer) per example."""
    out = []
    for inputs, targets, length in zip(data.inputs.tolist(), data.targets.tolist(), data.lengths.tolist()):
        scored = [t for t, target in enumerate(targets) if target != IGNORE]
        assert scored == [length - 1] and inputs[length - 1] == 1  # one answer, read at QUERY
        out.append((inputs[: length - 1], targets[length - 1]))
    return out


def test_parity_answers_count_the_ones():
    data = parity(num_examples=200, min_length=3, max_length=40, seed=1)
    assert 3 <= int(data.lengths.min() - 1) and int(data.lengths.max() - 1) <= 40
    answers = _answers(data)
    assert all(answer == 4 + symbols.count(3) % 2 for symbols, answer in answers)
    assert 60 < sum(answer == 5 for _, answer in answers) < 140


def test_modular_arithmetic_answers_match_python_arithmetic():
    for symbols, answer in _answers(modular_arithmetic(num_examples=200, min_length=1, max_length=21, seed=2)):
        text = "".join(str(s - 2) if s < 7 else "+-*"[s - 7] for s in symbols)
        assert answer == 10 + eval(text) % 5, text  # Python: * before + and -, % of a negative is >= 0


def test_bracket_matching_answers_match_a_reduction_check():
    answers = _answers(bracket_matching(num_examples=200, min_length=3, max_length=30, seed=4))
    balanced = 0
    for symbols, answer in answers:
        text = "".join("()[]"[s - 2] for s in symbols)
        assert len(text) % 2 == 0
        while re.search(r"\(\)|\[\]", text):
            text = re.sub(r"\(\)|\[\]", "", text)
        assert answer == (7 if text == "" else 6)
        balanced += text == ""
    assert 60 < balanced < 140


def test_selective_copying_targets_are_the_data_tokens_in_order():
    data = selective_copying(num_examples=20, seq_len=24, num_tokens=5, num_symbols=6, seed=5)
    for inputs, targets in zip(data.inputs.tolist(), data.targets.tolist()):
        tokens = [t for t in inputs[:24] if t != 2]
        assert len(tokens) == 5 and inputs[24] == 1 and inputs[25:] == tokens[:-1]
        assert targets[24:] == tokens and set(targets[:24]) == {IGNORE}


def test_generator_arguments_are_checked():
    with pytest.raises(ValueError, match="seq_len"):
        mqar(vocab_size=64, seq_len=10, num_kv_pairs=4)
    with pytest.raises(ValueError, match="unknown argument"):
        generate("parity", length=3)


def test_training_learns_a_task_that_is_learnable_in_a_few_steps():
    # one digit, then QUERY: the answer is the digit mod 5, a lookup this model learns in 20 steps (seeds 0-3)
    train = modular_arithmetic(num_examples=256, min_length=1, max_length=1, seed=0)
    test = modular_arithmetic(num_examples=64, min_length=1, max_length=1, seed=1)
    torch.manual_seed(0)
    from revival.eval.tasks import train_on_task
    from revival.models import LanguageModel

    model = LanguageModel(task_model_config("llama", train.vocab_size, 32))
    before = accuracy(model, test)["accuracy"]
    train_on_task(model, train, test, steps=30, batch_size=32, lr=1e-2, warmup_steps=5)
    after = accuracy(model, test)
    assert before < 0.5 and after["accuracy"] == 1.0 and after["scaled_accuracy"] == 1.0


def test_hybrid_gets_enough_blocks_for_each_kind():
    assert set(task_model_config("hybrid", 16, 32, num_blocks=2).pattern) == {"d", "a"}
    assert task_model_config("xlstm[1:1]", 16, 32, num_blocks=2).pattern == "ms"


def test_configs_tasks_yaml_are_the_paper_recipes():
    for task in RECIPES:
        raw = yaml.safe_load((ROOT / "configs" / "tasks" / f"{task}.yaml").read_text())
        assert TaskRecipe.from_dict(raw) == recipe(task, "paper"), task


def test_eval_task_command_writes_json_png_and_table(tmp_path, capsys):
    config = dict(RECIPES["parity"]["tiny"], steps=3, lrs=[1e-3, 3e-3])
    config["train_data"] = dict(config["train_data"], num_examples=64)
    config["test_data"] = dict(config["test_data"], num_examples=16)
    (tmp_path / "parity.yaml").write_text(yaml.safe_dump(config))
    status = main(["eval", "task", "parity", "--config", str(tmp_path / "parity.yaml"), "--models", "llama,mingru",
                   "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    assert status == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(result["runs"]) == 4 and len(result["table"]) == 2
    assert all(0 <= row["accuracy"] <= 1 for row in result["table"])
    assert "accuracy_by_length" in result["runs"][0]
    assert (tmp_path / "out" / "accuracy.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "llama" in printed and "mingru" in printed


def test_eval_task_bad_model_is_one_line_error(tmp_path, capsys):
    config = dict(RECIPES["parity"]["tiny"], steps=1)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(config))
    status = main(["eval", "task", "parity", "--config", str(tmp_path / "p.yaml"), "--models", "nosuchmodel",
                   "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert status == 2 and "nosuchmodel" in capsys.readouterr().err


def test_run_task_reports_best_lr_per_cell():
    # batch 8: under TRITON_INTERPRET=1 larger feed-forward tensors take the (slow) interpreted SwiGLU kernel
    small = dict(RECIPES["mqar"]["tiny"], steps=2, lrs=(1e-3, 1e-2), batch_size=8)
    small["train_data"] = dict(small["train_data"], num_examples=32)
    small["test_data"] = dict(small["test_data"], num_examples=8)
    result = run_task(TaskRecipe.from_dict(small), ["llama"], device="cpu", show_progress=False)
    best = max(result["runs"], key=lambda run: run["accuracy"])
    assert len(result["table"]) == 1 and result["table"][0]["accuracy"] == best["accuracy"]


def test_runs_record_a_learning_curve_and_stop_at_the_time_budget(tmp_path):
    from revival.eval.tasks import plot_task

    small = dict(RECIPES["parity"]["tiny"], steps=6, eval_every=2, batch_size=8)
    small["train_data"] = dict(small["train_data"], num_examples=32)
    small["test_data"] = dict(small["test_data"], num_examples=8)
    full = run_task(TaskRecipe.from_dict(small), ["llama"], device="cpu", show_progress=False)["runs"][0]
    assert [point["step"] for point in full["history"]] == [2, 4] and full["steps"] == 6
    assert all(set(point) == {"step", "seconds", "loss", "accuracy"} for point in full["history"])
    assert 0 < full["history"][0]["seconds"] < full["history"][1]["seconds"] <= full["seconds"]
    assert not full["stopped_by_time"]
    result = run_task(TaskRecipe.from_dict(small), ["llama"], device="cpu", show_progress=False)
    assert plot_task(result, tmp_path / "curve.png").stat().st_size > 1000  # bar, by length, learning curve
    capped = run_task(TaskRecipe.from_dict(dict(small, max_seconds=1e-9)), ["llama"], device="cpu",
                      show_progress=False)["runs"][0]
    assert capped["steps"] == 1 and capped["stopped_by_time"] and capped["history"] == []
    with pytest.raises(UserError, match="max_seconds"):
        TaskRecipe.from_dict(dict(small, max_seconds=0))


def test_parity_cpu_recipe_keeps_the_paper_model_and_data():
    cpu = load_recipe(ROOT / "configs" / "tasks" / "parity_cpu.yaml")
    paper = recipe("parity", "paper")
    for name in ("train_data", "test_data", "d_models", "num_blocks", "weight_decay", "warmup_steps"):
        assert getattr(cpu, name) == getattr(paper, name), name
    assert cpu.early_stop_accuracy == 0.99 and cpu.max_seconds is not None
    staged = load_recipe(ROOT / "configs" / "tasks" / "parity_cpu_curriculum.yaml")
    for name in ("train_data", "test_data", "d_models", "num_blocks", "weight_decay"):
        assert getattr(staged, name) == getattr(paper, name), name
    assert staged.curriculum == (12, 24)


def test_a_length_curriculum_trains_on_shorter_examples_first():
    small = dict(RECIPES["parity"]["tiny"], steps=6, eval_every=2, batch_size=8, curriculum=[6])
    small["train_data"] = dict(small["train_data"], num_examples=32)
    small["test_data"] = dict(small["test_data"], num_examples=8)
    run = run_task(TaskRecipe.from_dict(small), ["llama"], device="cpu", show_progress=False)["runs"][0]
    assert run["steps"] == 6 and [point["step"] for point in run["history"]] == [2, 5]  # stages of 3 + 3 steps
    assert [stage["steps"] for stage in run["curriculum"]] == [3, 3]
    assert [stage["max_length"] for stage in run["curriculum"]] == [6, 12]
    # a parity sequence is its bits and QUERY
    assert run["curriculum"][0]["longest_sequence"] <= 7 < run["curriculum"][1]["longest_sequence"] <= 13
    assert TaskRecipe.from_dict(small).to_dict()["curriculum"] == [6]
    for bad in ([12], [2], [8, 6], [6, 6]):  # not below max_length 12, below min_length 3, not increasing
        with pytest.raises(UserError, match="curriculum"):
            TaskRecipe.from_dict(dict(small, curriculum=bad))
    with pytest.raises(UserError, match="curriculum: needs a task with lengths"):
        TaskRecipe.from_dict(dict(RECIPES["mqar"]["tiny"], curriculum=[8]))
