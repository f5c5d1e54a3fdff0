"""XLSTMLargeLayer: the equations in float64, state continuation, init, errors, and Hugging Face's xLSTMLayer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from revival.layers.xlstm_large import XLSTMLargeLayer
from revival.ops.mlstm import mlstm
from tests.models._transformers import transformers_attribute


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def randomize_(layer: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std + (1.0 if p.ndim == 1 else 0.0))


def equations_float64(layer: XLSTMLargeLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer written out from docs/math.md with the op's recurrent reference, all in float64."""
    p = {name: t.double() for name, t in layer.state_dict().items()}
    x = x.double()
    B, T, _ = x.shape
    H, Dk, Dv = layer.num_heads, layer.qk_head_dim, layer.v_head_dim

    def linear(name, inp):
        return F.linear(inp, p[f"{name}.weight"], p.get(f"{name}.bias"))

    def heads(t, d):
        return t.view(B, T, H, d).transpose(1, 2)

    cap = layer.gate_soft_cap
    i = (cap * torch.tanh(linear("igate_preact", x) / cap)).transpose(1, 2)
    f = (cap * torch.tanh(linear("fgate_preact", x) / cap)).transpose(1, 2)
    h, _ = mlstm(heads(linear("q", x), Dk), heads(linear("k", x), Dk), heads(linear("v", x), Dv), i, f,
                 impl="recurrent", eps=layer.eps)
    h = h.transpose(1, 2)  # (B, T, H, Dv)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + layer.multihead_norm.eps)
    h = h.reshape(B, T, H * Dv) * p["multihead_norm.weight"]
    if "multihead_norm.bias" in p:
        h = h + p["multihead_norm.bias"]
    return linear("out_proj", torch.sigmoid(linear("ogate_preact", x)) * h)


@pytest.mark.parametrize("T", [1, 7, 16, 37])
@pytest.mark.parametrize("use_bias", [False, True])
def test_forward_matches_float64_equations(T, use_bias):
    torch.manual_seed(T)
    layer = XLSTMLargeLayer(32, 2, qk_dim_factor=0.5, v_dim_factor=1.0, use_bias=use_bias, chunk_size=16)
    randomize_(layer, seed=T)
    x = torch.randn(2, T, 32)
    y, state = layer(x)
    assert y.shape == (2, T, 32) and [s.dtype for s in state] == [torch.float32] * 3
    assert rel_err(y, equations_float64(layer, x)) < 1e-5


def test_float64_layer_matches_equations_exactly():
    layer = XLSTMLargeLayer(24, 3, qk_dim_factor=1.0, v_dim_factor=0.5, gate_soft_cap=5.0, chunk_size=8).double()
    randomize_(layer, seed=3, std=1.0)
    x = torch.randn(1, 29, 24, dtype=torch.float64)
    assert rel_err(layer(x)[0], equations_float64(layer, x)) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_prefill_then_steps_equals_one_forward(dtype, tol):
    torch.manual_seed(1)
    layer = XLSTMLargeLayer(32, 4, chunk_size=8).to(dtype)
    randomize_(layer, seed=1)
    x = torch.randn(2, 21, 32, dtype=dtype)
    full, full_state = layer(x)
    y, state = layer(x[:, :11])
    outs = [y]
    y, state = layer(x[:, 11:14], state)  # a multi-token continuation
    outs.append(y)
    for t in range(14, 21):
        y, state = layer(x[:, t:t + 1], state)
        outs.append(y)
    assert rel_err(torch.cat(outs, 1), full) < tol
    # states rescaled to a common stabilizer agree
    C, n, m = state
    Cf, nf, mf = full_state
    scale = torch.exp(m - mf)[..., None]
    assert rel_err(n * scale, nf) < tol and rel_err(C * scale[..., None], Cf) < tol


def test_extreme_gates_stay_finite_and_gradients_flow():
    layer = XLSTMLargeLayer(16, 2, chunk_size=8)
    randomize_(layer, seed=5, std=30.0)  # pre-activations far beyond the soft cap
    x = torch.randn(2, 19, 16, requires_grad=True)
    y, _ = layer(x)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_bfloat16_close_to_float32():
    layer = XLSTMLargeLayer(64, 2, chunk_size=16)
    randomize_(layer, seed=7, std=0.2)
    x = torch.randn(1, 40, 64)
    y32, _ = layer(x)
    y16, state = layer.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16 and state[0].dtype == torch.float32
    assert rel_err(y16, y32) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the float32-output product is a CUDA path")
def test_bfloat16_gates_without_autograd_equal_the_float32_product():
    """The gates of a bfloat16 layer without autograd come from a 16-bit product with float32 output; the same
    numbers as the float32 product of the same (exactly converted) inputs."""
    layer = XLSTMLargeLayer(256, 4).cuda().to(torch.bfloat16)
    randomize_(layer, seed=3, std=0.2)
    x = torch.randn(2, 300, 256, device="cuda").bfloat16()
    with torch.no_grad():
        i, f = layer._gates(x)
    weight = torch.cat([layer.igate_preact.weight, layer.fgate_preact.weight]).double()
    bias = torch.cat([layer.igate_preact.bias, layer.fgate_preact.bias]).double()
    preact = layer.gate_soft_cap * torch.tanh(F.linear(x.double(), weight, bias) / layer.gate_soft_cap)
    assert i.dtype == f.dtype == torch.float32
    assert rel_err(torch.cat([i, f], dim=-1), preact) < 1e-6


def test_parameter_names_shapes_and_init():
    layer = XLSTMLargeLayer(64, 4, qk_dim_factor=0.5, v_dim_factor=1.0)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "q.weight": (32, 64), "k.weight": (32, 64), "v.weight": (64, 64), "ogate_preact.weight": (64, 64),
        "igate_preact.weight": (4, 64), "igate_preact.bias": (4,), "fgate_preact.weight": (4, 64),
        "fgate_preact.bias": (4,), "multihead_norm.weight": (64,), "out_proj.weight": (64, 64),
    }
    assert (layer.igate_preact.weight == 0).all() and (layer.igate_preact.bias == -10).all()
    assert torch.equal(layer.fgate_preact.bias, torch.linspace(3, 6, 4))
    biased = {name for name, _ in XLSTMLargeLayer(64, 4, use_bias=True).named_parameters()}
    assert {"q.bias", "k.bias", "v.bias", "ogate_preact.bias", "multihead_norm.bias", "out_proj.bias"} <= biased


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(d_model=30, num_heads=4), "qk_dim_factor"),
        (dict(d_model=32, num_heads=4, v_dim_factor=0.1), "v_dim_factor"),
        (dict(d_model=32, num_heads=4, gate_soft_cap=0.0), "gate_soft_cap"),
        (dict(d_model=32, num_heads=4, impl="fast"), "impl"),
        (dict(d_model=32, num_heads=4, chunk_size=12), "chunk_size"),
        (dict(d_model=32, num_heads=0), "num_heads"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        XLSTMLargeLayer(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match="x: expected shape"):
        XLSTMLargeLayer(32, 4)(torch.randn(2, 5, 16))


@pytest.mark.parametrize("T", [16, 23, 1])
@pytest.mark.parametrize("use_bias", [False, True])
def test_matches_hugging_face_layer(T, use_bias):
    xLSTMLayer = transformers_attribute("models.xlstm.modeling_xlstm", "xLSTMLayer")
    xLSTMConfig = transformers_attribute("models.xlstm.configuration_xlstm", "xLSTMConfig")

    config = xLSTMConfig(hidden_size=64, num_heads=2, use_bias=use_bias, chunk_size=16, vocab_size=8,
                                      num_hidden_layers=1, gate_soft_cap=7.0, norm_eps=1e-5)
    hf_layer = xLSTMLayer(config).eval()
    randomize_(hf_layer, seed=11)
    layer = XLSTMLargeLayer(64, 2, gate_soft_cap=7.0, norm_eps=1e-5, use_bias=use_bias, chunk_size=16)
    layer.load_state_dict(hf_layer.state_dict(), strict=True)
    x = torch.randn(2, T, 64)
    with torch.no_grad():
        y_hf, (C_hf, n_hf, m_hf) = hf_layer(x)
        y, (C, n, m) = layer(x)
    assert rel_err(y, y_hf) < 1e-5
    scale = torch.exp(m - m_hf[..., 0])[..., None]
    assert rel_err(n * scale, n_hf) < 1e-5 and rel_err(C * scale[..., None], C_hf) < 1e-5
