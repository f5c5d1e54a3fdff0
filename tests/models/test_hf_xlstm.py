"""Hugging Face xLSTMForCausalLM checkpoints: same logits and greedy tokens as transformers, round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file

import revival
from revival.models import LanguageModel, ModelConfig
from revival.models.hf_xlstm import hf_config_from_revival, revival_config_from_hf, save_hf_xlstm
from tests.models._transformers import transformers_attribute

transformers = pytest.importorskip("transformers")
xLSTMPreTrainedModel = transformers_attribute("models.xlstm.modeling_xlstm", "xLSTMPreTrainedModel")

VOCAB = 97
# (hidden, heads, blocks, extra HF config); qk/v dims stay multiples of 64 (transformers' cache needs that)
SIZES = {
    # ffn 1.01 * 64 = 64.64: transformers rounds that to 64, a plain round-up to 128; revival follows transformers
    "d64-single": (64, 2, 2, dict(qk_dim_factor=1.0, weight_mode="single", ffn_proj_factor=1.01)),
    "d128-fused": (128, 4, 1, dict(weight_mode="fused", gate_soft_cap=5.0, output_logit_soft_cap=10.0)),
    "d128-v05-tied": (128, 1, 2, dict(v_dim_factor=0.5, weight_mode="fused", tie_word_embeddings=True,
                                      norm_eps=1e-5, eps=1e-4, ffn_proj_factor=1.5)),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def random_hf_model(size: str, seed: int = 0, chunk_size: int = 16):
    """A transformers xLSTMForCausalLM with every weight random (gates and norms included)."""
    hidden, heads, blocks, extra = SIZES[size]
    config = transformers.xLSTMConfig(hidden_size=hidden, num_heads=heads, num_hidden_layers=blocks, vocab_size=VOCAB,
                                      chunk_size=chunk_size, **extra)
    # transformers' own init crashes for weight_mode="fused"; every weight is overwritten below anyway
    with mock.patch.object(xLSTMPreTrainedModel, "_init_weights", lambda self, module: None):
        model = transformers.xLSTMForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:  # norm weights (and biases) around 1
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1 or "embeddings" in name:  # gate biases, embeddings: O(1)
                p.copy_(2.0 * noise if "gate" in name else noise)
            else:  # projections: O(1) outputs for O(1) inputs; gate pre-activations a few units wide
                p.copy_(noise * (2.0 if "gate_preact" in name else 1.0) / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for size in SIZES:
        model = random_hf_model(size, seed=len(out))
        directory = tmp_path_factory.mktemp(size)
        model.save_pretrained(directory)
        out[size] = (model, directory)
    return out


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("T", [32, 37])  # a multiple of the chunk size (16) and not
def test_float32_logits_match_transformers(hf_dirs, size, T):
    hf_model, directory = hf_dirs[size]
    model = revival.from_pretrained(directory)
    assert model.dtype == torch.float32 and set(model.config.pattern) == {"x"}
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        logits, _ = model(ids)
    assert rel_err(logits, hf_logits(hf_model, ids)) < 1e-5


@pytest.mark.parametrize("size", ["d64-single", "d128-fused"])
def test_bfloat16_checkpoint_logits_match_transformers(tmp_path, size):
    """A bfloat16 checkpoint run in bfloat16 vs transformers in float32 on the same (bfloat16-valued) weights."""
    hf_model = random_hf_model(size, seed=list(SIZES).index(size)).to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    model = revival.from_pretrained(tmp_path)  # takes the stored dtype
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids)
    assert rel_err(logits, hf_logits(hf_model.float(), ids)) < 2e-2


@pytest.mark.parametrize("size", ["d64-single", "d128-v05-tied"])
def test_prefill_and_greedy_steps_equal_transformers_generate(hf_dirs, size):
    hf_model, directory = hf_dirs[size]
    model = revival.from_pretrained(directory)
    prompt = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf_model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[:, 21:]
        logits, state = model(prompt)
        tokens = []
        for _ in range(16):
            token = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            logits, state = model(token, state)
    assert torch.equal(torch.cat(tokens, 1), expected)


@pytest.mark.parametrize("weight_mode", ["single", "fused"])
@pytest.mark.parametrize("tie", [False, True])
def test_revival_to_transformers_round_trip(tmp_path, weight_mode, tie):
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=VOCAB, d_model=128, pattern="xx", num_heads=2, chunk_size=16, tie_embeddings=tie,
                         logit_soft_cap=30.0, layer_options={"x": {"eps": 1e-5}})
    model = LanguageModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_hf_xlstm(model, tmp_path / "hf", weight_mode=weight_mode)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "xlstm" and written["architectures"] == ["xLSTMForCausalLM"]
    assert written["weight_mode"] == weight_mode and written["eps"] == 1e-5
    # transformers' init of fused gate biases crashes (its _init_weights mis-slices ifgate_preact.bias), also in
    # from_pretrained; every weight comes from the file, so skipping that init changes nothing here
    with mock.patch.object(xLSTMPreTrainedModel, "_init_weights", lambda self, module: None):
        hf_model = transformers.xLSTMForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        ours, _ = model(ids)
    assert rel_err(hf_logits(hf_model, ids), ours) < 1e-5
    back = revival.from_pretrained(tmp_path / "hf")  # and back: identical parameters, tie restored
    assert back.config == config
    for (name, p), (_, q) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(p, q), name


def test_save_pretrained_format_hf_overwrites_atomically(tmp_path):
    model = LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=64, pattern="x", num_heads=2, qk_dim_factor=1.0,
                                      logit_soft_cap=30.0))
    target = tmp_path / "ckpt"
    save_hf_xlstm(model, target, max_shard_bytes=20_000)  # sharded first ...
    assert (target / "model.safetensors.index.json").is_file() and len(list(target.glob("model-*"))) > 1
    model.save_pretrained(target, format="hf")  # ... then one file: stale shards and index are gone
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".ckpt*"))  # no staging directory left behind
    with pytest.raises(ValueError, match="pattern"):
        save_hf_xlstm(LanguageModel(ModelConfig(vocab_size=VOCAB, d_model=64, pattern="m")), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("writer", ["transformers", "revival"])
def test_sharded_checkpoint_loads(hf_dirs, tmp_path, writer):
    hf_model, directory = hf_dirs["d128-fused"]
    if writer == "transformers":
        hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    else:
        save_hf_xlstm(revival.from_pretrained(directory), tmp_path / "x", weight_mode="fused", max_shard_bytes=100_000)
        tmp_path = tmp_path / "x"
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    model = revival.from_pretrained(tmp_path, dtype=torch.float64)
    assert model.dtype == torch.float64
    ids = torch.randint(0, VOCAB, (1, 19))
    assert rel_err(model(ids)[0], hf_logits(hf_model, ids)) < 1e-5


def _copy_with(directory: Path, target: Path, edit_tensors=None, edit_config=None) -> Path:
    target.mkdir()
    tensors = load_file(str(directory / "model.safetensors"))
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(target / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize(
    "edit_tensors,edit_config,message",
    [
        (lambda t: t.pop("backbone.blocks.1.mlstm_layer.fgate_preact.bias"), None,
         r"missing tensors \['backbone.blocks.1.mlstm_layer.fgate_preact.bias'\]"),
        (lambda t: t.update({"backbone.blocks.0.extra.weight": torch.zeros(2)}), None,
         r"unexpected tensors \['backbone.blocks.0.extra.weight'\]"),
        (lambda t: t.update({"backbone.blocks.0.mlstm_layer.q.weight": torch.zeros(64, 32)}), None,
         r"backbone.blocks.0.mlstm_layer.q.weight: expected \(64, 64\), got \(64, 32\)"),
        (None, lambda c: c.update(architectures=["xLSTMModel"]), "architectures"),
        (None, lambda c: c.update(rope_scaling=None), r"unsupported key\(s\) \['rope_scaling'\]"),
        (None, lambda c: c.update(add_out_norm=False), "add_out_norm"),
        (None, lambda c: c.update(inference_state_dtype="bfloat16"), "inference_state_dtype"),
        (None, lambda c: c.update(norm_reduction_force_float32=False), "norm_reduction_force_float32"),
        (None, lambda c: c.update(weight_mode="stacked"), "weight_mode"),
        (None, lambda c: c.update(embedding_dim=32), "hidden_size=64 and embedding_dim=32 disagree"),
        (None, lambda c: c.update(mlstm_round_up_to_multiple_of=128), "mlstm_round_up_to_multiple_of"),
        (None, lambda c: c.update(use_bias=True), "use_bias"),
    ],
)
def test_bad_checkpoints_fail_naming_the_tensor_or_key(hf_dirs, tmp_path, edit_tensors, edit_config, message):
    directory = _copy_with(hf_dirs["d64-single"][1], tmp_path / "bad", edit_tensors, edit_config)
    with pytest.raises(ValueError, match=message):
        revival.from_pretrained(directory)


def test_fused_tensor_of_wrong_size_is_named(hf_dirs, tmp_path):
    def shrink(tensors):
        name = "backbone.blocks.0.mlstm_layer.qkv_opreact.weight"
        tensors[name] = tensors[name][:-1].clone()

    directory = _copy_with(hf_dirs["d128-fused"][1], tmp_path / "bad", shrink)
    with pytest.raises(ValueError, match=r"qkv_opreact.weight: expected \(384, 128\), got \(383, 128\)"):
        revival.from_pretrained(directory)


def test_config_mapping_defaults_and_non_computational_keys():
    config, weight_mode = revival_config_from_hf({"model_type": "xlstm", "embedding_dim": 4096, "num_blocks": 32,
                                                  "mlstm_round_up_to_multiple_of": 64, "head_dim": 512,
                                                  "chunkwise_kernel": "chunkwise--triton_xl_chunk", "mode": "train",
                                                  "force_bos_token_insert": True, "weight_mode": "fused"})
    assert weight_mode == "fused" and config.pattern == "x" * 32 and config.d_model == 4096
    assert (config.num_heads, config.vocab_size, config.logit_soft_cap, config.gate_soft_cap) == (8, 50304, 30.0, 15.0)
    assert LanguageModel.__init__ is not None and config.final_norm == "rms" and not config.tie_embeddings
    with pytest.raises(ValueError, match="layer_options"):
        hf_config_from_revival(config.replace(layer_options={"x": {"impl": "recurrent"}}))
    with pytest.raises(ValueError, match="qk_dim_factor"):
        hf_config_from_revival(config.replace(d_model=96, num_heads=2, pattern="x"))
    with pytest.raises(ValueError, match="logit_soft_cap"):
        hf_config_from_revival(config.replace(logit_soft_cap=None))
    assert revival_config_from_hf({"output_logit_soft_cap": None})[0].logit_soft_cap is None  # read: no cap


def test_names_and_shapes_are_checked_before_parameters_are_allocated(hf_dirs, tmp_path):
    directory = _copy_with(hf_dirs["d64-single"][1], tmp_path / "bad",
                           lambda t: t.pop("backbone.blocks.0.ffn.proj_down.weight"))
    with mock.patch.object(LanguageModel, "to_empty", side_effect=AssertionError("allocated")) as to_empty:
        with pytest.raises(ValueError, match="proj_down"):
            revival.from_pretrained(directory)
    assert not to_empty.called


def test_ffn_width_follows_transformers_rounding_both_ways():
    from revival.layers.ffn import ffn_hidden_dim
    from revival.models.hf_xlstm import _hf_round_up

    # 768 * 2.667 = 2048.256: transformers builds 2048, a plain round-up 2112
    config, _ = revival_config_from_hf({"hidden_size": 768, "num_hidden_layers": 1, "num_heads": 4})
    assert ffn_hidden_dim(768, config.ffn_proj_factor, config.ffn_round_up_to_multiple_of) == 2048
    ours = ModelConfig(d_model=768, pattern="x", num_heads=4, ffn_proj_factor=2.667, logit_soft_cap=30.0)  # 2112
    written = hf_config_from_revival(ours)
    assert _hf_round_up(768 * written["ffn_proj_factor"], written["ffn_round_up_to_multiple_of"]) == 2112
    assert hf_config_from_revival(ours.replace(d_model=4096))["ffn_proj_factor"] == 2.667  # agree: kept as is


def test_revival_generate_command_on_a_hugging_face_directory(tmp_path):
    """A Hub-style directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) works with
    `revival generate`: greedy text equals transformers' greedy generation decoded with the same tokenizer."""
    import subprocess
    import sys

    from revival.data.tokenizers import train_bpe

    text = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n    y = 0\n" * 20
    tokenizer = train_bpe([text], vocab_size=300, min_frequency=1)
    config = transformers.xLSTMConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, qk_dim_factor=1.0,
                                      vocab_size=tokenizer.vocab_size, chunk_size=16, eos_token_id=tokenizer.eos_id)
    with mock.patch.object(xLSTMPreTrainedModel, "_init_weights", lambda self, module: None):
        model = transformers.xLSTMForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if "norm" in name
                    else torch.randn(p.shape, generator=gen) / max(p.shape[-1], 1) ** 0.5)
    model.save_pretrained(tmp_path)
    tokenizer.tokenizer.save(str(tmp_path / "tokenizer.json"))  # a bare Hub tokenizer.json, no revival metadata
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))

    prompt = "def add"
    prompt_ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = model.generate(prompt_ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.eos_id)[0, prompt_ids.shape[1]:].tolist()
    result = subprocess.run(
        [sys.executable, "-m", "revival.cli", "generate", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8",
         "--temperature", "0", "--no-stop", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == prompt + tokenizer.decode(expected)
