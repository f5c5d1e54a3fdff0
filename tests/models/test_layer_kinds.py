"""The layer-kind declarations: every letter builds its declared block, sizes are derived when the block is built
(a plain ModelConfig and a preset build the same layers; `replace` re-derives), options are checked by name, the docs
and the benchmark sizes come from the declarations, and a new kind is one new file."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import textwrap

import pytest
import torch

import revival.layers
from revival import LanguageModel, ModelConfig, preset_config
from revival.bench.models import bench_config, bench_heads
from revival.layers.kinds import LayerKind, LayerOptions, layer_kinds
from revival.models import PATTERN_LETTERS, PRESET_NAMES, describe_layer_kinds


def _layer_kwargs(layer: torch.nn.Module, kind: LayerKind) -> dict:
    """The constructor options a built layer reports through its attributes (where it keeps them)."""
    return {f.name: getattr(layer, f.name) for f in dataclasses.fields(kind.options) if hasattr(layer, f.name)}


def test_every_declared_letter_builds_its_block():
    kinds = layer_kinds()
    assert set("msxaglMd") <= set(kinds) and set(PATTERN_LETTERS) == set(kinds)
    config = ModelConfig(vocab_size=11, d_model=16, num_heads=2, pattern="".join(kinds), chunk_size=8,
                         layer_options={"M": {"d_state": 8}})
    model = LanguageModel(config)
    for block, letter in zip(model.blocks, config.pattern):
        kind = kinds[letter]
        assert type(block.mixer) is kind.layer
        assert (block.ffn is None) == (kind.ffn is None)
        assert type(block.norm).__name__ == {"layer": "LayerNorm", "rms": "RMSNorm"}[kind.norm]
        assert PATTERN_LETTERS[letter] == f"{kind.name}: {kind.equation}"
    assert model(torch.randint(0, 11, (1, 5)))[0].shape == (1, 5, 11)


@pytest.mark.parametrize("preset, letter", [("mamba2", "M"), ("gated-deltanet", "d"), ("mingru", "g"),
                                            ("minlstm", "l"), ("llama", "a")])
def test_plain_config_and_preset_build_the_same_layers(preset, letter):
    numbers = dict(vocab_size=19, d_model=48, num_heads=3, chunk_size=16, use_bias=True)
    from_preset = preset_config(preset, num_blocks=2, **numbers)
    plain = ModelConfig(pattern=letter * 2, **{**numbers, "norm_eps": from_preset.norm_eps,
                                               "ffn_proj_factor": from_preset.ffn_proj_factor})
    kind = layer_kinds()[letter]
    assert kind.build_options(plain) == kind.build_options(from_preset)
    with torch.device("meta"):
        a, b = LanguageModel(plain), LanguageModel(from_preset)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_replace_re_derives_the_sizes():
    config = ModelConfig(vocab_size=19, d_model=64, num_heads=4, pattern="Md", chunk_size=16)
    wider = dataclasses.replace(config, num_heads=2)
    for cfg, heads in ((config, 4), (wider, 2)):
        mamba, delta = LanguageModel(cfg).blocks[0].mixer, LanguageModel(cfg).blocks[1].mixer
        assert mamba.num_heads == heads and mamba.head_dim == 2 * 64 // heads
        assert delta.num_heads == heads
    assert LanguageModel(config.replace(chunk_size=32)).blocks[0].mixer.chunk_size == 32


def test_caller_options_win_and_unknown_options_are_named():
    config = ModelConfig(vocab_size=19, d_model=64, num_heads=4, pattern="M", layer_options={"M": {"head_dim": 16}})
    assert LanguageModel(config).blocks[0].mixer.head_dim == 16
    with pytest.raises(ValueError, match=r"layer_options\['M'\]: unknown option\(s\) \['heads'\]; valid options: "
                                         r"\['d_state'"):
        ModelConfig(pattern="M", layer_options={"M": {"heads": 4}})
    with pytest.raises(ValueError, match=r"layer_options: expected keys among .*got 'q'"):
        ModelConfig(pattern="M", layer_options={"q": {}})


def test_docs_and_presets_come_from_the_declarations():
    text = describe_layer_kinds()
    for kind in layer_kinds().values():
        assert f"{kind.letter}  {kind.name}: {kind.equation}" in text
        for f in dataclasses.fields(kind.options):
            assert f"     {f.name} = " in text
        if kind.preset:
            assert kind.preset in PRESET_NAMES
            assert set(preset_config(kind.preset).pattern) == {kind.letter}
    assert "head_dim = None (derived: 128 here)" in text  # the default ModelConfig: 2 * 256 / 4
    mamba2 = [f.name for f in layer_kinds()["M"].options.listed_fields()]  # its own fields, then the shared dt / A
    assert mamba2[0] == "d_state" and mamba2[-5:] == ["conv_bias", "dt_min", "dt_max", "dt_init_floor", "A_init_range"]


def test_bench_sizes_come_from_the_declarations():
    assert bench_heads("mamba2", "125m") == 24 and bench_heads("jamba", "125m") == 12  # min(M 24, a 12)
    assert bench_heads("hybrid", "125m") == 6 and bench_heads("xlstm[7:1]", "1.3b") == 4
    tiny = bench_config("jamba", "tiny")
    assert tiny.layer_options == {"M": {"d_state": 16, "moe": preset_config("jamba").layer_options["M"]["moe"]}}


def test_a_new_kind_is_one_new_file(tmp_path, monkeypatch):
    """A layer file with its declaration, dropped into revival/layers (here: a directory added to its path), is a
    pattern letter: the config accepts it, the model builds and runs it, the docs list it."""
    (tmp_path / "toy_mixer.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        import torch
        from torch import nn

        from revival.layers.kinds import LayerKind, LayerOptions


        class ToyMixer(nn.Module):
            def __init__(self, d_model, *, width=None):
                super().__init__()
                self.width = width
                self.proj = nn.Linear(d_model, d_model)

            def reset_parameters(self):
                self.proj.reset_parameters()

            def forward(self, x, state=None):
                return self.proj(x), state


        @dataclass(frozen=True)
        class ToyOptions(LayerOptions):
            width: int | None = None  # d_model

            def derive(self, config):
                return dict(width=config.d_model)


        LAYER_KINDS = (LayerKind(letter="T", name="toy block", layer=ToyMixer, options=ToyOptions, norm="rms",
                                 ffn="swiglu"),)
    '''))
    monkeypatch.setattr(revival.layers, "__path__", [*revival.layers.__path__, str(tmp_path)])
    layer_kinds.cache_clear()
    try:
        config = ModelConfig(vocab_size=11, d_model=16, num_heads=2, pattern="mT")
        model = LanguageModel(config)
        assert model.blocks[1].mixer.width == 16
        assert model(torch.randint(0, 11, (1, 4)))[0].shape == (1, 4, 11)
        assert "T  toy block: x + ToyMixer(RMSNorm(x)); x + SwiGLU(RMSNorm(x))" in describe_layer_kinds()
    finally:
        monkeypatch.undo()
        layer_kinds.cache_clear()
        sys.modules.pop("revival.layers.toy_mixer", None)
    assert "T" not in layer_kinds()


def test_declarations_are_checked():
    class Options(LayerOptions):
        pass

    with pytest.raises(ValueError, match="letter: expected one character"):
        LayerKind(letter="MM", name="x", layer=torch.nn.Identity, options=Options, norm="rms", ffn=None)
    with pytest.raises(ValueError, match="norm: expected one of"):
        LayerKind(letter="Q", name="x", layer=torch.nn.Identity, options=Options, norm="batch", ffn=None)
    with pytest.raises(ValueError, match="options: expected a LayerOptions"):
        LayerKind(letter="Q", name="x", layer=torch.nn.Identity, options=dict, norm="rms", ffn=None)


def test_options_list_every_constructor_keyword():
    for kind in layer_kinds().values():
        params = [n for n in inspect.signature(kind.layer.__init__).parameters if n not in ("self", "d_model")]
        assert sorted(f.name for f in dataclasses.fields(kind.options)) == sorted(params), kind.letter


def test_mlstm_precision_reaches_the_mlstm_layers():
    config = ModelConfig(vocab_size=11, d_model=64, num_heads=2, pattern="mx", mlstm_precision="balanced")
    with torch.device("meta"):
        model = LanguageModel(config)
    assert [block.mixer.precision for block in model.blocks] == ["balanced", "balanced"]
    assert LanguageModel(config.replace(mlstm_precision="auto", d_model=16)).blocks[1].mixer.precision == "auto"
    with pytest.raises(ValueError, match=r"mlstm_precision: expected one of \['auto', .*'fast'.*got 'quick'"):
        ModelConfig(mlstm_precision="quick")
