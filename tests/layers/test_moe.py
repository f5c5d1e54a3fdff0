"""MoE feed-forward: the sorted-token path against the dense loop reference in float64 (forward, gradients, empty
experts), the load-balancing loss, the block option, the hybrid presets (qwen3-next, olmo-hybrid, jamba): prefill +
steps == one forward and save/load, and the gated / partial-RoPE attention options."""

from __future__ import annotations

import pytest
import torch

from revival.layers.attention import Attention
from revival.layers.moe import MoE, moe_aux_loss
from revival.models.model import LanguageModel, from_pretrained
from revival.models.presets import preset_config
from tests.layers._helpers import prefill_then_steps

F64 = torch.float64
D_MODEL = 16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def make_moe(impl: str, seed: int = 0, **options) -> MoE:
    torch.manual_seed(seed)
    kw = dict(num_experts=6, top_k=2, expert_hidden_dim=12, shared_hidden_dim=8) | options
    moe = MoE(D_MODEL, impl=impl, **kw).to(F64)
    with torch.no_grad():
        for p in moe.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return moe


@pytest.mark.parametrize("options", [{}, {"top_k": 1, "shared_hidden_dim": 0}, {"shared_gate": False},
                                     {"top_k": 3, "normalize_top_k": False}])
def test_sorted_equals_loop_reference_float64(options):
    x = torch.randn(2, 7, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=F64, requires_grad=True)
    results = []
    for impl in ("sorted", "loop"):
        moe = make_moe(impl, **options)
        y = moe(x)
        loss = y.square().sum() + moe.aux_loss
        results.append((y, moe.aux_loss, torch.autograd.grad(loss, [x, *moe.parameters()])))
    (y, aux, grads), (y_ref, aux_ref, grads_ref) = results
    assert rel_err(y, y_ref) < 1e-12 and rel_err(aux, aux_ref) < 1e-12
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < 1e-10


def test_experts_without_tokens_get_zero_gradients():
    """Data-parallel training needs a gradient for every parameter, also of an expert no token chose."""
    moe = make_moe("sorted", num_experts=8, top_k=1)
    x = torch.randn(1, 3, D_MODEL, dtype=F64)
    moe(x).sum().backward()
    chosen = moe.route(x.reshape(-1, D_MODEL))[1].unique()
    assert len(chosen) < 8
    for e in range(8):
        assert moe.w_up.grad is not None
        assert (moe.w_up.grad[e].abs().sum() > 0) == (e in chosen.tolist())


def test_load_balancing_loss():
    moe = make_moe("sorted", aux_loss_weight=0.1)
    x = torch.randn(40, D_MODEL, generator=torch.Generator().manual_seed(2), dtype=F64)
    moe(x)
    probs = torch.softmax(moe.router(x), dim=-1)
    experts = probs.topk(2, dim=-1).indices
    share = torch.stack([(experts == e).sum() for e in range(6)]).double() / experts.numel()
    assert torch.allclose(moe.aux_loss, 0.1 * 6 * (share * probs.mean(0)).sum())
    with torch.no_grad():
        moe.router.weight.zero_()  # a uniform router: E * sum_e f_e / E = 1 whatever the ties choose
    moe(x)
    assert abs(moe.aux_loss.item() - 0.1) < 1e-12
    weights = moe.route(x)[0]
    assert torch.allclose(weights.sum(-1), torch.ones(40, dtype=weights.dtype))


def test_block_option_places_moe_by_block_index_and_sums_aux_losses():
    moe = {"num_experts": 4, "top_k": 2, "every": 2, "offset": 1}
    config = preset_config("jamba", vocab_size=31, d_model=32, num_heads=2, num_blocks=8, chunk_size=8,
                           layer_options={"M": {"d_state": 8, "moe": moe}, "a": {"moe": moe}})
    model = LanguageModel(config)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLU", "MoE"] * 2 + ["SwiGLU", "MoE"] * 2
    assert moe_aux_loss(model) is None  # no forward yet
    model(torch.randint(0, 31, (2, 5)))
    assert torch.allclose(moe_aux_loss(model), sum(b.ffn.aux_loss for b in model.blocks[1::2]))
    mixer_only = LanguageModel(preset_config("xlstm[1:0]", vocab_size=31, d_model=32, num_blocks=2,
                                             layer_options={"m": {"moe": {"num_experts": 2, "top_k": 1}}}))
    assert all(isinstance(b.ffn, MoE) and b.ffn_norm is not None for b in mixer_only.blocks)
    assert LanguageModel(preset_config("jamba", vocab_size=31, d_model=32, num_heads=2, num_blocks=2,
                                       layer_options={"M": {"moe": None}})).blocks[1].ffn.__class__.__name__ == "SwiGLU"


def test_errors_name_the_option():
    with pytest.raises(ValueError, match=r"layer_options\['M'\]\['moe'\]: unknown option\(s\) \['experts'\]"):
        preset_config("jamba", layer_options={"M": {"moe": {"experts": 4}}})
    with pytest.raises(ValueError, match="every >= 1 and 0 <= offset < every"):
        preset_config("jamba", layer_options={"M": {"moe": {"every": 2, "offset": 2}}})
    with pytest.raises(ValueError, match="top_k: expected an int in"):
        MoE(D_MODEL, num_experts=2, top_k=3, expert_hidden_dim=4)
    with pytest.raises(ValueError, match="impl"):
        MoE(D_MODEL, num_experts=2, top_k=1, expert_hidden_dim=4, impl="grouped")


HYBRIDS = {"qwen3-next": "ddda", "olmo-hybrid": "ddda", "jamba": "MMMMa"}


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_presets_prefill_steps_and_save_load(name, tmp_path):
    small = {"qwen3-next": {"d": {"moe": {"num_experts": 4, "top_k": 2, "shared_proj_factor": 0.5}},
                            "a": {"moe": {"num_experts": 4, "top_k": 2, "shared_proj_factor": 0.5}}},
             "olmo-hybrid": {}, "jamba": {"M": {"d_state": 8, "moe": {"num_experts": 4, "top_k": 2, "every": 2,
                                                                       "offset": 1}}}}[name]
    config = preset_config(name, vocab_size=23, d_model=32, num_heads=2, num_blocks=len(HYBRIDS[name]),
                           chunk_size=8, layer_options=small)
    assert config.pattern == HYBRIDS[name]
    if name == "qwen3-next":
        assert config.layer_options["a"]["output_gate"] and config.layer_options["a"]["rope_fraction"] == 0.25
    torch.manual_seed(0)
    model = LanguageModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, _ = model(ids)
        assert rel_err(prefill_then_steps(model, ids, 9)[0], logits) < 1e-12
        loaded = from_pretrained(model.save_pretrained(tmp_path / name))
        assert loaded.config == config
        assert torch.equal(loaded(ids)[0], logits)


def test_gated_attention_and_partial_rope():
    torch.manual_seed(0)
    layer = Attention(D_MODEL, num_heads=2, output_gate=True, rope_fraction=0.25).to(F64)
    assert layer.rope_dim == 2 and layer.gate_proj is not None
    q = torch.randn(1, 2, 5, 8, dtype=F64)
    cos, sin = torch.cos(torch.ones(5, 2, dtype=F64)), torch.sin(torch.ones(5, 2, dtype=F64))
    rotated = layer._rope(q, cos, sin)
    assert torch.equal(rotated[..., 2:], q[..., 2:]) and not torch.equal(rotated[..., :2], q[..., :2])
    x = torch.randn(2, 6, D_MODEL, dtype=F64)
    with torch.no_grad():
        y, _ = layer(x)
        layer.gate_proj.weight.zero_()  # gate sigmoid(0) = 1/2 everywhere
        half, _ = layer(x)
        plain = Attention(D_MODEL, num_heads=2, rope_fraction=0.25).to(F64)
        plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("gate_proj")})
        assert torch.allclose(half, 0.5 * plain(x)[0] + 0.5 * plain.o_proj.bias if plain.o_proj.bias is not None
                              else 0.5 * plain(x)[0])
    assert not torch.allclose(y, half)
    with pytest.raises(ValueError, match="rope_fraction"):
        Attention(D_MODEL, num_heads=2, rope_fraction=0.0)
