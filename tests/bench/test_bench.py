"""The benchmark harness at tiny sizes on CPU: every study runs and writes the documented JSON schema and a PNG, the
FLOP model, the prefill shortcut (== the model's last logits), 125M sizing, the anchors and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from revival.bench import bench_config, run_study, training_flops_per_token
from revival.bench.cli import add_arguments, parse_context, run_bench_command
from revival.bench.models import build_runner, count_parameters, forward_last, transformers_version
from revival.models import preset_config

TOP_KEYS = {"study", "schema_version", "created", "device", "versions", "config", "models", "points", "wall_seconds",
            "plot"}
FIGURES = {
    "train": {"tokens", "micro_batches", "step_seconds", "tokens_per_s", "flops_per_token", "mfu", "peak_memory_bytes",
              "loss"},
    "prefill": {"ttft_seconds", "tokens_per_s", "peak_memory_bytes", "cuda_graph", "cuda_graph_error"},
    "decode": {"tokens_per_s", "step_seconds", "decode_tokens", "prefill_seconds", "peak_memory_bytes",
               "state_bytes_after_prefill", "cuda_graph", "cuda_graph_error"},
}
FAST = dict(warmup=0, repeats=1, decode_tokens=2)


def check_outputs(result: dict, out_dir, study: str, models: list[str], contexts: list[int], batches=(1,)) -> None:
    saved = json.loads((out_dir / f"bench_{study}.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved) == TOP_KEYS and saved["study"] == study and saved["schema_version"] == 1
    assert saved["device"]["type"] == "cpu" and saved["versions"]["torch"] == torch.__version__
    assert set(saved["versions"]) >= {"git_commit", "git_dirty"}  # the code that ran: a commit, edited or not
    assert saved["config"]["size"] == "tiny" and saved["config"]["contexts"] == contexts
    assert list(saved["models"]) == models
    assert [(p["model"], p["context"]) for p in saved["points"]] == \
        [(m, c) for m in models for c in contexts for _ in batches]
    for point in saved["points"]:
        assert point["status"] == "ok", point
        assert FIGURES[study] <= set(point)
        assert point["tokens_per_s"] > 0 and math.isfinite(point["tokens_per_s"])
        assert point["peak_memory_bytes"] is None  # CPU
    png = out_dir / saved["plot"]
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_study(tmp_path):
    result = run_study("train", presets=["mingru", "xlstm-large"], contexts=[16, 32], device="cpu", out_dir=tmp_path,
                       anchors=False, progress=False, tokens_per_step=64, **{k: FAST[k] for k in ("warmup", "repeats")})
    check_outputs(result, tmp_path, "train", ["mingru", "xlstm-large"], [16, 32])
    first = result["points"][0]
    assert first["batch"] == 4 and first["tokens"] == 64 and first["mfu"] is None  # no known peak on CPU
    assert first["flops_per_token"] == training_flops_per_token(bench_config("mingru", "tiny"), 16)
    assert result["models"]["mingru"]["pattern"] == "gg" and 0 < first["loss"] < 10


def test_train_study_falls_back_to_micro_batches(tmp_path, monkeypatch):
    """A step that does not fit is taken as gradient accumulation: same tokens, same loss, micro_batches recorded."""
    from revival.bench import models as bench_models

    original = bench_models.Runner.loss
    seen = []

    def loss_with_memory_limit(self, ids):
        seen.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("pretend: CUDA out of memory")
        if ids.shape[0] > 1:  # cuBLAS reports running out of memory as a RuntimeError
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return original(self, ids)

    monkeypatch.setattr(bench_models.Runner, "loss", loss_with_memory_limit)
    result = run_study("train", presets=["mingru"], contexts=[16], device="cpu", out_dir=tmp_path, anchors=False,
                       progress=False, tokens_per_step=64, **{k: FAST[k] for k in ("warmup", "repeats")})
    point = result["points"][0]
    assert point["status"] == "ok" and point["batch"] == 4 and point["micro_batches"] == 4 and point["tokens"] == 64
    assert seen[:2] == [4, 2] and set(seen[2:]) == {1}
    monkeypatch.undo()
    whole = run_study("train", presets=["mingru"], contexts=[16], device="cpu", out_dir=tmp_path, anchors=False,
                      progress=False, tokens_per_step=64, **{k: FAST[k] for k in ("warmup", "repeats")})
    assert whole["points"][0]["micro_batches"] == 1
    assert whole["points"][0]["loss"] == pytest.approx(point["loss"], rel=1e-5)  # same weights (seeded), same tokens


def test_prefill_study_with_anchor(tmp_path):
    if transformers_version() is None:
        pytest.skip("transformers is not installed: the anchor part has nothing to run")
    result = run_study("prefill", presets=["llama"], contexts=[8, 24], device="cpu", dtype="fp32", out_dir=tmp_path,
                       progress=False, **{k: FAST[k] for k in ("warmup", "repeats")})
    check_outputs(result, tmp_path, "prefill", ["llama", "hf-llama"], [8, 24])
    assert result["models"]["hf-llama"]["parameters"] == result["models"]["llama"]["parameters"]
    assert result["models"]["hf-llama"]["hf_class"] == "LlamaForCausalLM"


def test_decode_study_batches(tmp_path):
    result = run_study("decode", presets=["mamba2", "llama"], contexts=[8, 20], device="cpu", out_dir=tmp_path,
                       batch_sizes=[1, 2], anchors=False, progress=False, **FAST)
    check_outputs(result, tmp_path, "decode", ["mamba2", "llama"], [8, 20], batches=(1, 2))
    states = {(p["model"], p["context"], p["batch"]): p["state_bytes_after_prefill"] for p in result["points"]}
    assert states["mamba2", 8, 1] == states["mamba2", 20, 1] > 0  # recurrent: constant
    assert states["llama", 20, 2] > states["llama", 8, 2] > states["llama", 8, 1]  # KV cache grows
    assert all(p["cuda_graph"] is False for p in result["points"])


def test_failures_are_recorded_per_point(tmp_path):
    result = run_study("prefill", presets=["mingru"], contexts=[8, 16], device="cpu", out_dir=tmp_path,
                       anchors=False, progress=False, max_seconds=0.0, **FAST)
    assert [p["status"] for p in result["points"]] == ["skipped", "skipped"]
    assert (tmp_path / "bench_prefill.png").stat().st_size > 0
    result = run_study("prefill", presets=["no-such-preset"], contexts=[8], device="cpu", out_dir=tmp_path,
                       anchors=False, progress=False, **FAST)
    assert result["points"][0]["status"] == "error" and "unknown preset" in result["points"][0]["error"]


@pytest.mark.parametrize("name", ["xlstm[7:1]", "hybrid"])
def test_forward_last_matches_the_models_last_logits(name):
    runner = build_runner(name, "tiny", torch.device("cpu"), torch.float64)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, state = runner.model(ids)
        last, last_state = forward_last(runner.model, ids)
    torch.testing.assert_close(last, full[:, -1], rtol=1e-12, atol=1e-12)
    assert [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(last_state)] == \
        [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(state)]


@pytest.mark.parametrize("preset", ["hybrid", "qwen3-next", "olmo-hybrid", "jamba", "xlstm[7:1]", "mamba2"])
def test_tiny_size_holds_every_block_kind_of_the_preset(preset):
    tiny = bench_config(preset, "tiny").pattern
    kinds = set(preset_config(preset).pattern)
    assert set(tiny) == kinds, tiny
    minimum = 3 if preset.startswith("xlstm[") else 2
    assert len(tiny) == minimum or set(tiny[:-1]) != kinds, tiny  # the smallest such depth: CPU tests stay cheap


def test_125m_and_1_3b_sizes_and_flop_model():
    for size, target in (("125m", 125e6), ("1.3b", 1.3e9)):
        for preset in ("xlstm-large", "llama", "mamba2", "hybrid"):
            config = bench_config(preset, size)
            assert abs(count_parameters(config) - target) / target < 0.05, (size, preset)
    large = bench_config("xlstm-large", "1.3b")  # the xLSTM-7B's head dims: 256 for q/k, 512 for v
    assert large.d_model * large.qk_dim_factor / large.num_heads == 256
    assert large.d_model * large.v_dim_factor / large.num_heads == 512
    llama = bench_config("llama", "125m")
    n = count_parameters(llama)  # tied embeddings: the table is the head's matrix, counted once
    attention = 6 * llama.num_blocks * llama.d_model * 4096
    assert training_flops_per_token(llama, 4096) == 6 * n + attention
    assert training_flops_per_token(bench_config("mamba2", "125m"), 4096) == \
        training_flops_per_token(bench_config("mamba2", "125m"), 128)


def test_hf_xlstm_anchor_matches_size_and_steps():
    if transformers_version() is None:
        pytest.skip("transformers is not installed: the anchor part has nothing to run")
    runner = build_runner("hf-xlstm", "tiny", torch.device("cpu"), torch.float32)
    ours = build_runner("xlstm-large", "tiny", torch.device("cpu"), torch.float32)
    assert runner.num_parameters() == ours.num_parameters()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        logits, state = runner.prefill(ids)
        step_logits, _ = runner.step(ids[:, :1], state)
    assert logits.shape == step_logits.shape == (1, 256) and torch.isfinite(step_logits).all()


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revival")
    add_arguments(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parses_and_runs(tmp_path, capsys):
    args = make_parser().parse_args(["bench", "decode", "--presets", "minlstm", "--contexts", "8,16", "--size", "tiny",
                                     "--device", "cpu", "--out", str(tmp_path), "--no-progress", "--no-anchors",
                                     "--batch-sizes", "1"])
    assert args.contexts == [8, 16] and args.presets == ["minlstm"] and args.batch_sizes == [1]
    assert run_bench_command(args) == 0
    assert "minlstm" in capsys.readouterr().out
    assert json.loads((tmp_path / "bench_decode.json").read_text())["config"]["presets"] == ["minlstm"]
    assert (tmp_path / "bench_decode.png").stat().st_size > 0
    defaults = make_parser().parse_args(["bench", "train"])
    assert defaults.size == "125m" and defaults.presets is None and defaults.out == "runs/bench"


def test_cli_rejects_bad_arguments(capsys):
    assert parse_context("2k") == 2048 and parse_context("300") == 300
    for argv in (["bench", "sing"], ["bench", "train", "--contexts", "2q"], ["bench", "train", "--size", "7b"]):
        with pytest.raises(SystemExit):
            make_parser().parse_args(argv)
    with pytest.raises(ValueError, match="name: expected one of"):
        run_study("serve", presets=["llama"], contexts=[8])
    with pytest.raises(ValueError, match="batch_sizes"):
        run_study("train", presets=["llama"], contexts=[8], batch_sizes=[2], device="cpu")
    with pytest.raises(ValueError, match="settings: unknown"):
        run_study("train", presets=["llama"], contexts=[8], device="cpu", steps=3)


def test_graph_check_rejects_a_replay_that_drifts():
    """The decode study times a CUDA graph only if its replays match eager steps (checked here with stand-ins)."""
    from revival.bench.studies import _graph_mismatch, _tree_copy_, _tree_map

    runner = build_runner("mingru", "tiny", torch.device("cpu"), torch.float32)
    runner.model.eval()
    with torch.no_grad():
        _, state = runner.prefill(torch.randint(0, runner.config.vocab_size, (1, 8)))
        static_state = _tree_map(lambda t: t.clone(), state)
        static_ids = torch.zeros(1, 1, dtype=torch.long)
        calls = []

        def faithful(token):  # what a correct graph does: one step on the static state, written back
            logits, new_state = runner.step(token, static_state)
            _tree_copy_(static_state, new_state)
            calls.append(1)
            return logits

        def drifting(token):  # a step that forgets to advance its state after the first call
            logits, new_state = runner.step(token, static_state)
            if not calls:
                _tree_copy_(static_state, new_state)
            calls.append(1)
            return logits

        assert _graph_mismatch(runner, faithful, state, static_state, static_ids) is None
        flat = []
        _tree_map(lambda t: flat.append(t), static_state)
        original = []
        _tree_map(lambda t: original.append(t), state)
        assert all(torch.equal(a, b) for a, b in zip(flat, original)) and flat  # restored
        calls.clear()
        message = _graph_mismatch(runner, drifting, state, static_state, static_ids)
        assert message is not None and "step 2" in message, message  # the first stale state is read at step 2


def test_plot_legend_names_every_model_also_those_missing_from_the_last_panel(tmp_path):
    from revival.bench.report import plot_study

    def point(model, context, state):
        return {"model": model, "context": context, "batch": 1, "status": "ok", "tokens_per_s": 10.0 * context,
                "peak_memory_bytes": 2**30, "state_bytes_after_prefill": state}

    points = [point(m, c, 2**20 if not m.startswith("hf-") else None) for m in ("llama", "hf-llama") for c in (8, 16)]
    result = {"study": "decode", "points": points, "device": {"type": "cpu"},
              "config": {"batch_sizes": [1], "contexts": [8, 16], "size": "tiny", "dtype": "float32"}}
    labels = plot_study(result, tmp_path / "decode.png")
    assert labels == ["llama", "hf-llama"] and (tmp_path / "decode.png").stat().st_size > 0


def test_transformers_notices_are_silenced_while_an_anchor_is_measured():
    import warnings

    transformers_logging = pytest.importorskip("transformers.utils.logging")
    from revival.bench.studies import quiet_transformers

    before = transformers_logging.get_verbosity()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_transformers():
            warnings.warn("`cache_params` is deprecated", FutureWarning, stacklevel=1)
            assert transformers_logging.get_verbosity() == transformers_logging.ERROR
    assert not caught and transformers_logging.get_verbosity() == before
