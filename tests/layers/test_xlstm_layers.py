"""xLSTM paper layers (mLSTM, sLSTM) and FFNs: float64 references, exact continuation, gradients, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from revival.layers.ffn import GatedMLP, SwiGLU, ffn_hidden_dim
from revival.layers.mlstm_layer import HeadwiseLinear, MLSTMLayer
from revival.layers.slstm_layer import SLSTMLayer, powerlaw_forget_bias
from revival.ops.mlstm import mlstm

DT = torch.float64


def flat(state):
    """All tensors of a (nested) state tuple, in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [t for s in state for t in flat(s)]


def assert_close_all(a, b, atol=1e-10):
    for x, y in zip(flat(a), flat(b), strict=True):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=atol, rtol=1e-9), (x - y).abs().max()


def check_prefill_then_steps(layer, x, prefill):
    y_full, state_full = layer(x)
    y, state = layer(x[:, :prefill])
    outs = [y]
    for t in range(prefill, x.shape[1]):
        y_t, state = layer(x[:, t : t + 1], state)
        outs.append(y_t)
    assert_close_all(torch.cat(outs, dim=1), y_full)
    assert_close_all(state, state_full)
    sizes = [t.numel() for t in flat(state)]
    assert sizes == [t.numel() for t in flat(layer(x[:, :1])[1])], "state must not grow with T"


def check_split(layer, x, split):
    y_full, state_full = layer(x)
    y1, state = layer(x[:, :split])
    y2, state = layer(x[:, split:], state)
    assert_close_all(torch.cat([y1, y2], dim=1), y_full)
    assert_close_all(state, state_full)


def check_gradients(layer, x, zero_grad_ok=()):
    y, _ = layer(x)
    (y.square().sum() + y.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name not in zero_grad_ok:
            assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------- mLSTM


def mlstm_layer_reference(layer: MLSTMLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer spelled out: dense block-diagonal matrices, a conv loop, group norm by hand, recurrent mLSTM."""
    B, T, _ = x.shape
    H, hd, inner = layer.num_heads, layer.head_dim, layer.inner_dim
    up = x @ layer.proj_up.weight.T
    x_m, z = up[..., :inner], up[..., inner:]
    K = layer.conv.kernel_size
    padded = torch.cat([x.new_zeros(B, K - 1, inner), x_m], dim=1)
    w = layer.conv.weight[:, 0]  # (inner, K)
    conv = torch.stack([(padded[:, t : t + K] * w.T).sum(1) for t in range(T)], dim=1) + layer.conv.bias
    conv_act = conv * torch.sigmoid(conv)

    def dense(proj: HeadwiseLinear) -> torch.Tensor:
        return torch.block_diag(*proj.weight)

    q, k, v = conv_act @ dense(layer.q_proj).T, conv_act @ dense(layer.k_proj).T, x_m @ dense(layer.v_proj).T
    qkv = torch.cat([q, k, v], -1)
    i, f = layer.igate(qkv), layer.fgate(qkv)

    def heads(t):
        return t.reshape(B, T, H, hd).transpose(1, 2)

    h, _ = mlstm(heads(q), heads(k), heads(v), i.transpose(1, 2), f.transpose(1, 2), impl="recurrent")
    h = h.transpose(1, 2)  # (B, T, H, hd)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    h = h.reshape(B, T, inner) * layer.outnorm.weight
    out = (h + layer.learnable_skip * conv_act) * F.silu(z)
    return out @ layer.proj_down.weight.T


def random_mlstm(seed, **kwargs):
    torch.manual_seed(seed)
    layer = MLSTMLayer(16, **kwargs).to(DT)
    with torch.no_grad():  # move gates away from their init so the test exercises them
        layer.igate.weight.normal_(0, 0.1)
        layer.fgate.weight.normal_(0, 0.1)
        layer.learnable_skip.normal_(1, 0.5)
        layer.outnorm.weight.normal_(1, 0.5)
    return layer


@pytest.mark.parametrize("impl", ["chunkwise", "parallel"])
def test_mlstm_layer_matches_reference(impl):
    layer = random_mlstm(0, num_heads=4, chunk_size=8, impl=impl)
    x = torch.randn(2, 19, 16, dtype=DT)
    y, (conv_state, (C, n, m)) = layer(x)
    assert y.shape == (2, 19, 16) and y.dtype == DT
    assert conv_state.shape == (2, 3, 64) and C.shape == (2, 4, 16, 16) and n.shape == (2, 4, 16) and m.shape == (2, 4)
    assert torch.allclose(y, mlstm_layer_reference(layer, x), atol=1e-10)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mlstm_layer_prefill_then_steps(seed):
    layer = random_mlstm(seed, num_heads=2, chunk_size=8)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 21, 16, generator=g, dtype=DT)
    check_prefill_then_steps(layer, x, prefill=int(torch.randint(1, 21, (1,), generator=g)))


@pytest.mark.parametrize("split", [1, 8, 13, 20])
def test_mlstm_layer_split(split):
    check_split(random_mlstm(4, chunk_size=8), torch.randn(3, 21, 16, dtype=DT), split)


def test_mlstm_layer_gradients_and_float32():
    layer = random_mlstm(5, qkv_block_size=8, bias=True).float()
    x = torch.randn(2, 11, 16, requires_grad=True)
    check_gradients(layer, x)
    y, state = layer(x.detach())
    assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in flat(state))


def test_mlstm_layer_init():
    torch.manual_seed(6)
    layer = MLSTMLayer(128, num_heads=4)
    assert layer.inner_dim == 256 and layer.head_dim == 64
    assert torch.equal(layer.fgate.bias.detach(), torch.linspace(3.0, 6.0, 4))
    assert layer.igate.weight.abs().sum() == 0 and layer.fgate.weight.abs().sum() == 0
    assert 0 < layer.igate.bias.abs().max() < 0.6
    assert torch.equal(layer.learnable_skip.detach(), torch.ones(256))
    assert abs(layer.proj_up.weight.std().item() - math.sqrt(2 / (5 * 128))) < 0.01
    assert abs(layer.q_proj.weight.std().item() - math.sqrt(2 / (5 * 128))) < 0.01
    layer.reset_parameters(num_blocks=8)
    assert abs(layer.proj_down.weight.std().item() - 2 / (8 * math.sqrt(128))) < 0.005
    assert MLSTMLayer(48, proj_factor=2.0).inner_dim == 128  # rounded up to a multiple of 64


def test_mlstm_layer_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        MLSTMLayer(32, num_heads=3)
    with pytest.raises(ValueError, match="qkv_block_size"):
        MLSTMLayer(32, qkv_block_size=5)
    with pytest.raises(ValueError, match="chunk_size"):
        MLSTMLayer(32, chunk_size=12)
    with pytest.raises(ValueError, match="impl"):
        MLSTMLayer(32, impl="cuda")
    with pytest.raises(ValueError, match="x"):
        MLSTMLayer(32)(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="state"):
        MLSTMLayer(32)(torch.randn(1, 2, 32), state=torch.zeros(1))


# ----------------------------------------------------------------------------------------------------------- sLSTM


def slstm_layer_reference(layer: SLSTMLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer spelled out with dense block-diagonal matrices and the docs/math.md recurrence, one unit at a time."""
    B, T, D = x.shape
    H, d = layer.num_heads, layer.head_dim
    K = layer.conv.kernel_size
    padded = torch.cat([x.new_zeros(B, K - 1, D), x], dim=1)
    w = layer.conv.weight[:, 0]
    conv = torch.stack([(padded[:, t : t + K] * w.T).sum(1) for t in range(T)], dim=1) + layer.conv.bias
    conv_act = conv * torch.sigmoid(conv)
    W = {name: torch.block_diag(*getattr(layer, name).weight) for name in ("igate", "fgate", "zgate", "ogate")}
    R = torch.stack([torch.block_diag(*layer.recurrent_weight[g]) for g in range(4)])  # (4, D, D)
    bias = layer.gate_bias.reshape(4, D)
    c, n, m, y = (x.new_zeros(B, D) for _ in range(4))
    outs = []
    for t in range(T):
        pre = [conv_act[:, t] @ W["igate"].T, conv_act[:, t] @ W["fgate"].T, x[:, t] @ W["zgate"].T,
               x[:, t] @ W["ogate"].T]
        i, f, z, o = (pre[g] + y @ R[g] + bias[g] for g in range(4))
        logfm = m + F.logsigmoid(f)
        m_new = torch.where(n == 0, i, torch.maximum(i, logfm))
        ibar, fbar = torch.exp(i - m_new), torch.exp(logfm - m_new)
        c = fbar * c + ibar * torch.tanh(z)
        n = fbar * n + ibar
        m = m_new
        y = torch.sigmoid(o) * c / n
        outs.append(y)
    h = torch.stack(outs, dim=1).reshape(B, T, H, d)
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return h.reshape(B, T, D) * layer.group_norm.weight


def random_slstm(seed, d_model=16, **kwargs):
    torch.manual_seed(seed)
    layer = SLSTMLayer(d_model, **kwargs).to(DT)
    with torch.no_grad():  # recurrent weights start at 0: make them matter
        layer.recurrent_weight.normal_(0, 0.3)
        layer.group_norm.weight.normal_(1, 0.5)
    return layer


def test_slstm_layer_matches_reference():
    layer = random_slstm(10, num_heads=4)
    x = torch.randn(2, 9, 16, dtype=DT)
    y, (conv_state, (c, n, m, y_state)) = layer(x)
    assert y.shape == (2, 9, 16) and y.dtype == DT
    assert conv_state.shape == (2, 3, 16) and all(t.shape == (2, 4, 4) for t in (c, n, m, y_state))
    assert torch.allclose(y, slstm_layer_reference(layer, x), atol=1e-10)


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_slstm_layer_prefill_then_steps(seed):
    layer = random_slstm(seed, num_heads=2)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 17, 16, generator=g, dtype=DT)
    check_prefill_then_steps(layer, x, prefill=int(torch.randint(1, 17, (1,), generator=g)))


@pytest.mark.parametrize("split", [1, 6, 16])
@pytest.mark.parametrize("conv_kernel", [4, 0])
def test_slstm_layer_split(split, conv_kernel):
    check_split(random_slstm(14, conv_kernel=conv_kernel), torch.randn(3, 17, 16, dtype=DT), split)


def test_slstm_layer_gradients_and_float32():
    layer = random_slstm(15, num_heads=4).float()
    x = torch.randn(2, 10, 16, requires_grad=True)
    check_gradients(layer, x)
    y, (conv_state, cell) = layer(x.detach())
    assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in cell)


def test_slstm_layer_init():
    layer = SLSTMLayer(64, num_heads=4)
    assert layer.recurrent_weight.abs().sum() == 0
    bias = layer.gate_bias.detach()
    assert bias[0].abs().sum() == 0 and bias[2].abs().sum() == 0 and bias[3].abs().sum() == 0
    forget = bias[1]  # (H, d): same power law in every head, from +5 down to -7
    assert torch.allclose(forget, forget[:1].expand(4, -1))
    assert forget[0, 0].item() == pytest.approx(5.0) and forget[0, -1].item() == pytest.approx(-7.0)
    assert (forget[0, 1:] < forget[0, :-1]).all()
    u = 5 / 15
    assert forget[0, 5].item() == pytest.approx(5 - 12 * u**0.3, rel=1e-6)
    layer.reset_parameters(block_index=2, num_blocks=3)
    assert layer.gate_bias[1, 0, 5].item() == pytest.approx(5 - 12 * u**1.6, rel=1e-6)
    assert torch.allclose(powerlaw_forget_bias(16, 1, 3)[5], torch.tensor(5 - 12 * u**0.95, dtype=torch.float64))
    assert abs(layer.zgate.weight.std().item() - math.sqrt(2 / (5 * 64))) < 0.02
    assert SLSTMLayer(16, bias=False).gate_bias is None


def test_slstm_layer_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        SLSTMLayer(30, num_heads=4)
    with pytest.raises(ValueError, match="impl"):
        SLSTMLayer(32, impl="cuda")
    with pytest.raises(ValueError, match="x"):
        SLSTMLayer(32)(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="state"):
        SLSTMLayer(32)(torch.randn(1, 2, 32), state=(torch.zeros(1, 3, 32),))


@pytest.mark.parametrize("make", [lambda: random_mlstm(16, chunk_size=8), lambda: random_slstm(16)])
def test_layers_finite_on_extreme_inputs(make):
    layer = make().float()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(20.0)  # gate pre-activations in the hundreds
    x = (torch.randn(2, 12, 16) * 100).requires_grad_()
    y, state = layer(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in flat(state))
    assert torch.isfinite(x.grad).all()


# -------------------------------------------------------------------------------------------------------------- FFN


def test_gated_mlp_matches_formula():
    torch.manual_seed(7)
    mlp = GatedMLP(48, bias=True).to(DT)
    assert mlp.hidden_dim == 64  # round_up(4/3 * 48, 64)
    x = torch.randn(2, 5, 48, dtype=DT)
    up = mlp.proj_up(x)
    ref = mlp.proj_down(F.gelu(up[..., :64]) * up[..., 64:])
    assert torch.allclose(mlp(x), ref, atol=1e-12)
    xg = torch.randn(2, 5, 48, requires_grad=True)
    check_gradients(_AsMixer(mlp.float()), xg)
    with pytest.raises(ValueError, match="activation"):
        GatedMLP(48, activation="tanh")


def test_swiglu_matches_formula_and_hidden_dim():
    assert ffn_hidden_dim(4096) == 10944 and ffn_hidden_dim(64, 4 / 3, 64) == 128
    torch.manual_seed(8)
    ffn = SwiGLU(32, 96).to(DT)
    x = torch.randn(3, 4, 32, dtype=DT)
    ref = ffn.proj_down(F.silu(ffn.proj_up_gate(x)) * ffn.proj_up(x))
    assert torch.allclose(ffn(x), ref, atol=1e-12)
    assert {n for n, _ in ffn.named_parameters()} == {"proj_up_gate.weight", "proj_up.weight", "proj_down.weight"}
    check_gradients(_AsMixer(ffn.float()), torch.randn(2, 3, 32, requires_grad=True))
    ffn.reset_parameters(num_blocks=4)
    assert abs(ffn.proj_down.weight.std().item() - 2 / (4 * math.sqrt(32))) < 0.02


class _AsMixer(torch.nn.Module):
    """Wrap an FFN as forward(x) -> (y, None) so the gradient helper applies."""

    def __init__(self, ffn):
        super().__init__()
        self.ffn = ffn

    def forward(self, x):
        return self.ffn(x), None


@pytest.mark.parametrize("make", [lambda: MLSTMLayer(32, chunk_size=8), lambda: SLSTMLayer(32), lambda: GatedMLP(32),
                                  lambda: SwiGLU(32, 64)])
def test_bfloat16_close_to_float32(make):
    torch.manual_seed(17)
    layer = make()
    x = torch.randn(2, 19, 32)

    def run(module, inputs):
        out = module(inputs)
        return out[0] if isinstance(out, tuple) else out

    ref = run(layer, x)
    y = run(layer.to(torch.bfloat16), x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.03
