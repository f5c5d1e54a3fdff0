"""Every named preset at a tiny size: it builds, prefill + single-token steps == one forward (float64), recurrent-only
presets hold a state whose size does not depend on the context, hybrids hold a KV cache only in their attention blocks,
and the YAML run configs for the presets parse and build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from revival import LanguageModel, preset_config
from revival.models import state_bytes
from tests.models._helpers import VOCAB, prefill_then_steps, randomized, rel_err, short_and_long_states

# preset -> depth at the tiny size (deep enough that each kind of block in the preset's pattern appears)
PRESETS = {
    "xlstm[1:0]": 2, "xlstm[7:1]": 3, "xlstm-large": 2, "llama": 2, "mingru": 2, "minlstm": 2, "mamba2": 2,
    "gated-deltanet": 2, "hybrid": 4, "jamba": 5,
}
RECURRENT_ONLY = ["xlstm[1:0]", "xlstm[7:1]", "xlstm-large", "mingru", "minlstm", "mamba2", "gated-deltanet"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def tiny_model(name: str, dtype: torch.dtype, d_model: int = 16, seed: int = 0) -> LanguageModel:
    config = preset_config(name, vocab_size=VOCAB, d_model=d_model, num_heads=2, num_blocks=PRESETS[name],
                           chunk_size=8, layer_options={"M": {"d_state": 8}} if "M" in _pattern(name) else {})
    torch.manual_seed(seed)
    return randomized(LanguageModel(config).to(dtype))


def _pattern(name: str) -> str:
    return preset_config(name, num_blocks=PRESETS[name]).pattern


def test_sibling_preset_patterns():
    assert preset_config("mingru", num_blocks=3).pattern == "ggg"
    assert preset_config("minlstm", num_blocks=3).pattern == "lll"
    assert preset_config("mamba2", num_blocks=3).pattern == "MMM"
    assert preset_config("gated-deltanet", num_blocks=3).pattern == "ddd"
    assert preset_config("hybrid").pattern == "ddda" * 2
    assert preset_config("hybrid", num_blocks=6).pattern == "dddadd"
    assert preset_config("jamba").pattern == "MMMMaMMM"
    jamba = preset_config("jamba", num_blocks=32).pattern
    assert jamba.count("a") == 4 and [i for i, c in enumerate(jamba) if c == "a"] == [4, 12, 20, 28]


def test_sibling_layer_sizes_follow_the_model_and_yield_to_the_caller():
    mamba = LanguageModel(preset_config("mamba2", d_model=96, num_heads=3, chunk_size=16)).blocks[0].mixer
    assert (mamba.d_state, mamba.head_dim, mamba.num_heads, mamba.chunk_size) == (128, 64, 3, 16)
    mine = preset_config("mamba2", d_model=96, num_heads=3, layer_options={"M": {"d_state": 16, "expand": 1}})
    mixer = LanguageModel(mine).blocks[0].mixer
    assert mixer.d_state == 16 and mixer.head_dim == 32
    delta = LanguageModel(preset_config("hybrid", d_model=64, num_heads=4, vocab_size=11)).blocks[0].mixer
    assert delta.num_heads == 4 and delta.chunk_size == 64


@pytest.mark.parametrize("name", list(PRESETS))
def test_prefill_then_single_token_steps_match_full_forward(name):
    model = tiny_model(name, torch.float64)
    assert set(model.config.pattern) == set(_pattern(name))
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    total = 19
    prefill = int(torch.randint(1, total - 2, (1,), generator=gen))
    ids = torch.randint(0, VOCAB, (2, total), generator=gen)
    with torch.no_grad():
        full, _ = model(ids)
        assert torch.isfinite(full).all()
    assert rel_err(prefill_then_steps(model, ids, prefill), full) < 1e-12, (name, prefill)


@pytest.mark.parametrize("name", RECURRENT_ONLY)
def test_recurrent_presets_hold_a_constant_state(name):
    model = tiny_model(name, torch.float32, d_model=8)
    short, long = short_and_long_states(model, 1024, seed=5)
    assert state_bytes(short) == state_bytes(long) > 0


@pytest.mark.parametrize("name", ["llama", "hybrid", "jamba"])
def test_presets_with_attention_grow_a_kv_cache_in_attention_blocks_only(name):
    model = tiny_model(name, torch.float32)
    with torch.no_grad():
        _, short = model(torch.randint(0, VOCAB, (1, 16)))
        _, long = model(torch.randint(0, VOCAB, (1, 32)))
    for letter, a, b in zip(model.config.pattern, short, long):
        growth = state_bytes(b) - state_bytes(a)
        assert growth == (2 * 16 * 16 * 4 if letter == "a" else 0), letter  # k and v: 16 tokens x d_model x fp32


def test_unknown_preset_lists_the_siblings():
    with pytest.raises(ValueError, match="gated-deltanet.*hybrid.*jamba"):
        preset_config("mamba4")


@pytest.mark.parametrize("name", ["mingru", "minlstm", "mamba2", "gated-deltanet", "hybrid", "jamba"])
def test_tiny_run_config_builds_the_preset(name):
    raw = yaml.safe_load((CONFIGS / f"{name}-tiny.yaml").read_text())
    options = dict(raw["model"])
    assert options.pop("preset") == name
    with torch.device("meta"):
        model = LanguageModel(preset_config(name, vocab_size=256, **options))
    assert 0.5e6 < model.num_parameters() < 5e6


def test_num_blocks_disagreeing_with_the_pattern_is_refused():
    with pytest.raises(ValueError, match="num_blocks: 4 disagrees with pattern='mmmmmm'"):
        preset_config("xlstm[1:0]", num_blocks=4, pattern="mmmmmm")
    assert len(preset_config("xlstm[1:0]", num_blocks=6, pattern="mmmmmm").pattern) == 6
