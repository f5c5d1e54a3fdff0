"""Mamba-3 mixer: the chunkwise path against the reference loop in float64 (forward, gradients), prefill + steps ==
one forward (float64, float32, SISO and MIMO), constant state size, the preset as a model, save/load, errors."""

from __future__ import annotations

import pytest
import torch

import revival.layers.mamba3 as mamba3_module
from revival.layers.mamba3 import Mamba3
from revival.models.model import LanguageModel, from_pretrained
from revival.models.presets import preset_config
from revival.ops.mamba3 import mamba3_reference
from tests.layers._helpers import prefill_then_steps

F64 = torch.float64
D_MODEL = 16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def make_layer(mimo_rank: int, dtype=F64, seed: int = 0) -> Mamba3:
    torch.manual_seed(seed)
    layer = Mamba3(D_MODEL, d_state=8, head_dim=8, mimo_rank=mimo_rank, chunk_size=4).to(dtype)
    with torch.no_grad():  # larger random weights than the init, so every term (angles, trapezoid) matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def make_input(seed: int, T: int, dtype=F64, B: int = 2) -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


@pytest.mark.parametrize("mimo_rank", [1, 2])
def test_forward_and_gradients_match_reference(mimo_rank, monkeypatch):
    layer = make_layer(mimo_rank)
    x = make_input(1, 11).requires_grad_()
    y, state = layer(x)
    grads = torch.autograd.grad(y.square().sum() + state[1].sum(), [x, *layer.parameters()])
    monkeypatch.setattr(mamba3_module, "mamba3", lambda *a, chunk_size, document_starts: mamba3_reference(
        *a, document_starts=document_starts))
    y_ref, state_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum() + state_ref[1].sum(), [x, *layer.parameters()])
    assert rel_err(y, y_ref) < 1e-12
    for got, want in zip(state, state_ref):
        assert rel_err(got, want) < 1e-12
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("dtype,tolerance", [(F64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mimo_rank", [1, 2])
def test_prefill_then_steps_equals_one_forward(mimo_rank, dtype, tolerance):
    layer = make_layer(mimo_rank, dtype)
    x = make_input(2, 26, dtype)
    with torch.no_grad():
        y_full, state_full = layer(x)
        y, state = prefill_then_steps(layer, x, 17, 22)
    assert rel_err(y, y_full) < tolerance
    for got, want in zip(state, state_full):
        assert rel_err(got, want) < tolerance


def test_state_size_does_not_depend_on_T():
    layer = make_layer(2)
    with torch.no_grad():
        shapes = {T: [tuple(s.shape) for s in layer(make_input(3, T))[1]] for T in (1, 7, 40)}
    assert shapes[1] == shapes[7] == shapes[40]
    assert shapes[1] == [(2, 4, 4), (2, 4, 8, 8), (2, 4, 2, 8), (2, 4, 2, 8)]


def test_low_precision_runs_with_float32_state():
    layer = make_layer(1, torch.bfloat16)
    y, state = layer(make_input(4, 9, torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert all(s.dtype == torch.float32 for s in state)


def test_reset_parameters_resets_every_parameter():
    layer = make_layer(2, torch.float32)
    fresh = Mamba3(D_MODEL, d_state=8, head_dim=8, mimo_rank=2, chunk_size=4)
    layer.reset_parameters()
    for (name, p), q in zip(layer.named_parameters(), fresh.parameters()):
        if name in ("in_proj.weight", "out_proj.weight"):  # random init: compare the spread
            assert abs(p.std().item() - q.std().item()) < 0.2 * q.std().item(), name
        elif name == "dt_bias":  # softplus(dt_bias) log-uniform in [dt_min, dt_max]
            dt = torch.nn.functional.softplus(p)
            assert (dt >= layer.dt_min * 0.999).all() and (dt <= layer.dt_max * 1.001).all()
        elif name == "A_log":
            assert (p.exp() >= layer.A_init_range[0] - 1e-4).all() and (p.exp() <= layer.A_init_range[1] + 1e-4).all()
        else:
            assert torch.equal(p, q), name


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="d_state: expected an even number"):
        Mamba3(D_MODEL, d_state=7, head_dim=8)
    with pytest.raises(ValueError, match="head_dim"):
        Mamba3(D_MODEL, head_dim=5)
    with pytest.raises(ValueError, match="mimo_rank"):
        Mamba3(D_MODEL, head_dim=8, mimo_rank=0)
    layer = make_layer(1)
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.zeros(2, 3, D_MODEL + 1, dtype=F64))
    with pytest.raises(ValueError, match="document_starts"):
        layer(make_input(0, 4), document_starts=torch.zeros(2, 5, dtype=torch.bool))


def test_packed_documents_equal_separate_calls():
    layer = make_layer(2)
    x = make_input(5, 14)
    starts = torch.zeros(2, 14, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 6] = True
    with torch.no_grad():
        y, state = layer(x, document_starts=starts)
        first, _ = layer(x[:1, :6])
        second, state_second = layer(x[:1, 6:])
    assert rel_err(y[:1], torch.cat([first, second], dim=1)) < 1e-12
    for got, want in zip(state, state_second):
        assert rel_err(got[:1], want) < 1e-12


def test_preset_model_prefill_steps_and_save_load(tmp_path):
    config = preset_config("mamba3", d_model=32, num_heads=4, num_blocks=2, vocab_size=50, chunk_size=8,
                           layer_options={"3": {"d_state": 8, "mimo_rank": 2}})
    assert config.pattern == "33"
    torch.manual_seed(0)
    model = LanguageModel(config).double().eval()
    ids = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids)
        assert rel_err(prefill_then_steps(model, ids, 13)[0], logits) < 1e-12
        path = model.save_pretrained(tmp_path / "mamba3")
        loaded = from_pretrained(path)
        assert loaded.config == config
        assert torch.equal(loaded(ids)[0], logits)
