"""LanguageModel: exact continuation for every block kind, constant recurrent state, KV-cache growth, config checks,
presets, parameter counting."""

from __future__ import annotations

import pytest
import torch

from revival import LanguageModel, ModelConfig, preset_config
from revival.models import PATTERN_LETTERS, state_bytes, xlstm_pattern
from tests.models._helpers import VOCAB, prefill_then_steps, randomized, rel_err, short_and_long_states

PATTERNS = ["m", "s", "x", "a", "mmsm", "xa", "msxa", "gl", "Md"]
SMALL_MAMBA = {"M": {"head_dim": 8, "d_state": 8}}


def tiny_config(pattern: str, d_model: int = 16, **overrides) -> ModelConfig:
    overrides.setdefault("layer_options", SMALL_MAMBA)
    return ModelConfig(vocab_size=VOCAB, d_model=d_model, num_heads=2, pattern=pattern, chunk_size=8, **overrides)


def tiny_model(pattern: str, dtype=torch.float64, seed: int = 0, **overrides) -> LanguageModel:
    torch.manual_seed(seed)
    return randomized(LanguageModel(tiny_config(pattern, **overrides)).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefill_then_steps_matches_full_forward(pattern, dtype):
    model = tiny_model(pattern, dtype)
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(ids)
        assert torch.isfinite(full).all()
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        for prefill in (1, 6, 17):  # shorter than, not a multiple of, and longer than a chunk
            assert rel_err(prefill_then_steps(model, ids, prefill), full) < tol, (pattern, dtype, prefill)
        # Uneven multi-token chunks continue exactly too.
        logits_a, state = model(ids[:, :9])
        logits_b, state = model(ids[:, 9:20], state)
        logits_c, _ = model(ids[:, 20:], state)
        assert rel_err(torch.cat([logits_a, logits_b, logits_c], 1), full) < tol


@pytest.mark.parametrize("pattern", ["m", "s", "x", "ms", "mx", "g", "l", "M", "d"])
def test_recurrent_state_bytes_do_not_grow_with_context(pattern):
    model = tiny_model(pattern, torch.float32, d_model=8)
    short, long = short_and_long_states(model, 1024, seed=2)
    assert state_bytes(short) == state_bytes(long) == model.state_bytes(long) > 0
    shapes = lambda s: [tuple(t.shape) for t in _flatten(s)]  # noqa: E731
    assert shapes(short) == shapes(long)


@pytest.mark.parametrize("pattern", ["a", "xa"])
def test_attention_state_grows_as_a_kv_cache(pattern):
    model = tiny_model(pattern, torch.float32)
    sizes = []
    with torch.no_grad():
        for T in (16, 32, 48):
            _, state = model(torch.randint(0, VOCAB, (2, T)))
            sizes.append(state_bytes(state))
    per_token = (sizes[1] - sizes[0]) / 16
    # k and v caches: 2 tensors x batch 2 x d_model (num_kv_heads == num_heads) x 4 bytes, per attention block.
    assert per_token == 2 * 2 * 16 * 4 * pattern.count("a")
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0]


def test_gradients_reach_every_parameter():
    model = tiny_model("msxaglMd", torch.float64)
    ids = torch.randint(0, VOCAB, (2, 12))
    logits, _ = model(ids)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_logit_soft_cap_bounds_logits():
    model = tiny_model("a", logit_soft_cap=0.5)
    logits, _ = model(torch.randint(0, VOCAB, (1, 7)))
    assert logits.abs().max() < 0.5
    uncapped = tiny_model("a")
    raw, _ = uncapped(torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3)))
    capped_model = tiny_model("a", logit_soft_cap=0.5)
    capped, _ = capped_model(torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(capped, 0.5 * torch.tanh(raw / 0.5))


def test_tied_head_shares_embedding_and_counts_once():
    untied = LanguageModel(tiny_config("xa"))
    tied = LanguageModel(tiny_config("xa", tie_embeddings=True))
    assert tied.lm_head.weight is tied.embedding.weight
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 16
    assert tied.num_parameters(exclude_embeddings=True) == untied.num_parameters(exclude_embeddings=True)
    assert "parameters=" in repr(tied) and f"{tied.num_parameters():,}" in tied.summary()


def test_forward_rejects_bad_input():
    model = LanguageModel(tiny_config("m"))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.randint(0, VOCAB, (5,)))
    with pytest.raises(ValueError, match="state"):
        model(torch.randint(0, VOCAB, (1, 3)), state=[None, None])


# ---------------------------------------------------------------------- config


def test_config_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError, match="unknown key.*'n_layers'.*valid keys.*'d_model'"):
        ModelConfig.from_dict({"d_model": 32, "n_layers": 4})


@pytest.mark.parametrize("bad, match", [
    ({"pattern": "mq"}, r"pattern: unknown letter.*'q'.*'m'"),
    ({"pattern": ""}, "pattern"),
    ({"d_model": 0}, "d_model: expected a positive integer"),
    ({"vocab_size": -3}, "vocab_size"),
    ({"d_model": 30, "num_heads": 4}, r"num_heads: 4 does not divide d_model=30; choose one of \[1, 2, 3, 5"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"chunk_size": 12}, "chunk_size"),
    ({"final_norm": "batch"}, r"final_norm: expected one of \['layer', 'rms'\]"),
    ({"mlstm_impl": "magic"}, "mlstm_impl"),
    ({"logit_soft_cap": 0.0}, "logit_soft_cap"),
    ({"dropout": 1.5}, "dropout"),
    ({"tie_embeddings": "yes"}, "tie_embeddings"),
    ({"layer_options": {"z": {}}}, "layer_options"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({"d_model": 32, "num_heads": 4, **bad})


def test_config_round_trips_through_dict():
    config = tiny_config("msxaglMd", logit_soft_cap=30.0, layer_options={"g": {"expansion": 2}})
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.replace(d_model=32).d_model == 32
    assert set("msxaglMd") <= set(PATTERN_LETTERS)  # new kinds add letters (revival/layers/kinds.py)


# ---------------------------------------------------------------------- presets


def test_xlstm_presets_place_slstm_blocks():
    assert preset_config("xlstm[3:1]").pattern == "msmm"
    assert preset_config("xlstm[1:0]", num_blocks=6).pattern == "mmmmmm"
    assert preset_config("xlstm[0:1]", num_blocks=3).pattern == "sss"
    pattern = preset_config("xlstm[7:1]", num_blocks=16).pattern
    assert pattern == "msmmmmmm" * 2 and pattern.count("s") == 2
    assert preset_config("xlstm[7:1]", num_blocks=12, slstm_at=[3, 9]).pattern == "mmmsmmmmmsmm"
    assert xlstm_pattern(2, 2, 8) == "mssmmssm"
    config = preset_config("xlstm[7:1]")
    assert config.final_norm == "layer" and config.logit_soft_cap is None


def test_large_and_llama_presets():
    seven = preset_config("xlstm-7b")
    assert (seven.d_model, seven.num_blocks, seven.num_heads, seven.vocab_size, seven.norm_eps) == \
        (4096, 32, 8, 50304, 1e-6)
    assert seven.pattern == "x" * 32 and seven.logit_soft_cap == 30.0 and seven.final_norm == "rms"
    small = preset_config("xlstm-large", d_model=64, num_blocks=3, vocab_size=100)
    assert small.pattern == "xxx" and small.d_model == 64 and small.gate_soft_cap == 15.0
    llama = preset_config("llama", d_model=64, num_heads=4, num_kv_heads=2, num_blocks=2)
    assert llama.pattern == "aa" and llama.num_kv_heads == 2
    model = LanguageModel(preset_config("llama", vocab_size=50, d_model=32, num_heads=4, num_blocks=2))
    assert model(torch.randint(0, 50, (1, 5)))[0].shape == (1, 5, 50)


def test_preset_errors():
    with pytest.raises(ValueError, match="unknown preset 'gpt'.*xlstm-large"):
        preset_config("gpt")
    with pytest.raises(ValueError, match="unknown key.*'width'"):
        preset_config("llama", width=3)
    with pytest.raises(ValueError, match="num_blocks"):
        preset_config("xlstm-large", num_blocks=0)
    with pytest.raises(ValueError, match="slstm_at"):
        preset_config("xlstm[7:1]", num_blocks=4, slstm_at=[4])


def _flatten(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if state is None:
        return []
    return [t for s in state for t in _flatten(s)]
