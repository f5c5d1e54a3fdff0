"""Gated DeltaNet's allow_neg_eigval (OLMo Hybrid): beta = 2 sigmoid(W_b x) in (0, 2), the olmo-hybrid preset turns
it on, and it survives save/load. (Fast path vs the float64 reference loop with the option: test_sibling_layers.py's
"gated-deltanet-neg-eigval".)"""

from __future__ import annotations

import pytest
import torch

import revival.layers.gated_deltanet as gdn_module
from revival.layers.gated_deltanet import GatedDeltaNet
from revival.models.model import LanguageModel, from_pretrained
from revival.models.presets import preset_config

F64 = torch.float64


def betas_seen(layer: GatedDeltaNet, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """The beta the layer hands to its op."""
    seen = []
    op = gdn_module.gated_delta_rule

    def recording_op(q, k, v, g, beta, *args, **kwargs):
        seen.append(beta)
        return op(q, k, v, g, beta, *args, **kwargs)

    monkeypatch.setattr(gdn_module, "gated_delta_rule", recording_op)
    with torch.no_grad():
        layer(x)
    return seen[0]


@pytest.mark.parametrize("allow_neg_eigval", [False, True])
def test_beta_range(allow_neg_eigval, monkeypatch):
    torch.manual_seed(0)
    layer = GatedDeltaNet(16, num_heads=2, head_dim=8, chunk_size=8, allow_neg_eigval=allow_neg_eigval).to(F64)
    with torch.no_grad():
        layer.b_proj.weight.mul_(8.0)  # pre-activations far from 0, so beta nears the ends of its range
    x = torch.randn(2, 40, 16, dtype=F64)
    beta = betas_seen(layer, x, monkeypatch)
    with torch.no_grad():
        expected = torch.sigmoid(layer.b_proj(x)) * (2 if allow_neg_eigval else 1)
    assert torch.equal(beta, expected)
    high = 2.0 if allow_neg_eigval else 1.0
    assert beta.min() > 0 and beta.max() < high
    assert beta.max() > 0.95 * high and beta.min() < 0.05 * high


def test_olmo_hybrid_preset_turns_it_on_and_others_do_not():
    small = dict(vocab_size=11, d_model=32, num_heads=2, num_blocks=4, chunk_size=8)
    for name, expected in (("olmo-hybrid", True), ("hybrid", False), ("qwen3-next", False), ("gated-deltanet", False)):
        model = LanguageModel(preset_config(name, **small))
        flags = {m.allow_neg_eigval for m in model.modules() if isinstance(m, GatedDeltaNet)}
        assert flags == {expected}, name
    off = preset_config("olmo-hybrid", layer_options={"d": {"allow_neg_eigval": False}}, **small)
    assert {m.allow_neg_eigval for m in LanguageModel(off).modules() if isinstance(m, GatedDeltaNet)} == {False}


def test_save_load_keeps_the_option(tmp_path):
    config = preset_config("olmo-hybrid", vocab_size=11, d_model=32, num_heads=2, num_blocks=4, chunk_size=8)
    torch.manual_seed(0)
    model = LanguageModel(config).double().eval()
    ids = torch.randint(0, 11, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids)
        loaded = from_pretrained(model.save_pretrained(tmp_path / "olmo-hybrid")).double().eval()
        assert loaded.config == config and loaded.config.layer_options["d"]["allow_neg_eigval"] is True
        assert torch.equal(loaded(ids)[0], logits)
        for m in loaded.modules():  # the same weights without the option give other logits: the option is live
            if isinstance(m, GatedDeltaNet):
                m.allow_neg_eigval = False
        assert not torch.allclose(loaded(ids)[0], logits)
