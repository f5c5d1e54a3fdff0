"""MinGRU, MinLSTM, Mamba2, GatedDeltaNet mixers: fast path vs the reference loops in float64 (forward, gradients),
prefill + single-token steps == one forward, state size independent of T, errors."""

from __future__ import annotations

import pytest
import torch

import revival.layers.gated_deltanet as gdn_module
import revival.layers.mamba2 as mamba2_module
import revival.layers.mamba3 as mamba3_module
from revival.layers.gated_deltanet import GatedDeltaNet
from revival.layers.mamba2 import Mamba2
from revival.layers.mamba3 import Mamba3
from revival.layers.mingru import MinGRU
from revival.layers.minlstm import MinLSTM
from revival.ops.delta_rule import gated_delta_rule_reference
from revival.ops.ssd import ssd_reference
from tests.layers._helpers import prefill_then_steps

F64 = torch.float64
D_MODEL = 16

LAYERS = {
    "mingru": lambda: MinGRU(D_MODEL, chunk_size=8),
    "mingru-chunked-noconv": lambda: MinGRU(D_MODEL, expansion=1.0, conv_kernel=0, scan_impl="chunked", chunk_size=4),
    "minlstm": lambda: MinLSTM(D_MODEL, chunk_size=8),
    "minlstm-chunked": lambda: MinLSTM(D_MODEL, expansion=2.0, conv_kernel=3, scan_impl="chunked", chunk_size=4),
    "mamba2": lambda: Mamba2(D_MODEL, d_state=8, head_dim=8, n_groups=2, chunk_size=8),
    "gated-deltanet": lambda: GatedDeltaNet(D_MODEL, num_heads=2, head_dim=8, chunk_size=8),
    "gated-deltanet-neg-eigval": lambda: GatedDeltaNet(D_MODEL, num_heads=2, head_dim=8, chunk_size=8,
                                                       allow_neg_eigval=True),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def make_layer(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layer = LAYERS[name]().to(F64)
    with torch.no_grad():  # larger random weights than the init, so the gates reach saturation
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer


def make_input(seed: int, T: int, B: int = 2) -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=F64)


def use_reference_ops(layer: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the layer through the plain loops of its op."""
    if isinstance(layer, (MinGRU, MinLSTM)):
        monkeypatch.setattr(layer, "scan_impl", "reference")

        def step_via_reference_loop(*branches_and_h):
            *branches, h = branches_and_h
            return layer._scan(*(b[:, None] for b in branches), h)[1]

        monkeypatch.setattr(layer, "_step", step_via_reference_loop)
    monkeypatch.setattr(mamba2_module, "ssd", lambda *a, chunk_size=64, document_starts=None:
                        ssd_reference(*a, document_starts=document_starts))
    monkeypatch.setattr(gdn_module, "gated_delta_rule", lambda *a, scale=None, chunk_size=64, document_starts=None:
                        gated_delta_rule_reference(*a, scale=scale, document_starts=document_starts))


def forward_and_grads(layer, x, state=None):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y, new_state = layer(x, state)
    weights = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    ((y * weights).sum() + sum(s.pow(2).sum() for s in new_state)).backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    grads["x"] = x.grad
    return y.detach(), [s.detach() for s in new_state], grads


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("T", [1, 19])
def test_forward_and_gradients_match_reference(name, T, monkeypatch):
    layer = make_layer(name)
    x = make_input(1, T)
    with torch.no_grad():
        _, state = layer(make_input(2, 5))  # a non-trivial initial state
    y, new_state, grads = forward_and_grads(layer, x, state)
    use_reference_ops(layer, monkeypatch)
    y_ref, new_state_ref, grads_ref = forward_and_grads(layer, x, state)
    assert rel_err(y, y_ref) < 1e-11
    for s, s_ref in zip(new_state, new_state_ref):
        if s_ref.numel():
            assert rel_err(s, s_ref) < 1e-11
    for key, g_ref in grads_ref.items():
        assert rel_err(grads[key], g_ref) < 1e-10, key


@pytest.mark.parametrize("name", list(LAYERS))
def test_prefill_then_steps_equals_one_forward(name):
    layer = make_layer(name, seed=3)
    x = make_input(4, 26)
    with torch.no_grad():
        y_full, state_full = layer(x)
        y, state = prefill_then_steps(layer, x, 11, 20)
    assert rel_err(y, y_full) < 1e-12
    for s, s_full in zip(state, state_full):
        assert s.shape == s_full.shape
        if s_full.numel():
            assert rel_err(s, s_full) < 1e-12


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_size_does_not_depend_on_T(name):
    layer = make_layer(name)
    with torch.no_grad():
        shapes = {T: [tuple(s.shape) for s in layer(make_input(5, T))[1]] for T in (1, 7, 50)}
    assert shapes[1] == shapes[7] == shapes[50]


@pytest.mark.parametrize("name", list(LAYERS))
def test_low_precision_runs_with_float32_state(name):
    torch.manual_seed(0)
    layer = LAYERS[name]().to(torch.bfloat16)
    x = make_input(6, 9).to(torch.bfloat16)
    y, state = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    assert state[1].dtype == torch.float32
    y_step, _ = layer(x[:, :1], state)
    assert y_step.dtype == torch.bfloat16 and torch.isfinite(y_step).all()


@pytest.mark.parametrize("name", list(LAYERS))
def test_reset_parameters_resets_every_parameter(name):
    layer = LAYERS[name]()
    snapshots = []
    for _ in range(2):
        with torch.no_grad():
            for p in layer.parameters():
                p.fill_(0.123)
        torch.manual_seed(7)
        layer.reset_parameters()
        snapshots.append({key: p.detach().clone() for key, p in layer.named_parameters()})
    for key, p in snapshots[0].items():
        assert not torch.all(p == 0.123), f"{key} was not reset"
        assert torch.equal(p, snapshots[1][key]), key
    if isinstance(layer, (Mamba2, GatedDeltaNet)):
        dt = torch.nn.functional.softplus(layer.dt_bias)
        assert torch.all(dt >= layer.dt_init_floor * 0.999) and torch.all(dt <= layer.dt_max * 1.001)
        A = torch.exp(layer.A_log)
        assert torch.all(A >= 1.0 - 1e-6) and torch.all(A <= 16.0 + 1e-5)


@pytest.mark.parametrize("name", list(LAYERS))
def test_errors_name_the_argument(name):
    layer = LAYERS[name]()
    with pytest.raises(ValueError, match="^x:"):
        layer(torch.randn(2, 5, D_MODEL + 1))
    with pytest.raises(ValueError, match="^x:"):
        layer(torch.randn(2, 0, D_MODEL))
    with pytest.raises(ValueError, match="^state"):
        layer(torch.randn(2, 5, D_MODEL), state=(torch.zeros(2),))
    _, state = layer(torch.randn(2, 3, D_MODEL))
    with pytest.raises(ValueError, match="^state"):
        layer(torch.randn(2, 1, D_MODEL), state=(state[0], state[1][:1]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="^head_dim:"):
        Mamba2(16, head_dim=5)
    with pytest.raises(ValueError, match="^n_groups:"):
        Mamba2(16, head_dim=8, n_groups=3)
    with pytest.raises(ValueError, match="^scan_impl:"):
        MinGRU(16, scan_impl="fast")
    with pytest.raises(ValueError, match="^proj_out:"):
        MinLSTM(16, expansion=2.0, proj_out=False)
    with pytest.raises(ValueError, match="^num_heads:"):
        GatedDeltaNet(16, num_heads=0)


def test_shapes_and_sizes():
    layer = Mamba2(32, d_state=16, head_dim=16, n_groups=2)
    assert (layer.d_inner, layer.num_heads) == (64, 4)
    _, (conv_state, ssm_state) = layer(torch.randn(3, 5, 32))
    assert conv_state.shape == (3, 3, 64 + 2 * 2 * 16) and ssm_state.shape == (3, 4, 16, 16)
    layer = GatedDeltaNet(32, num_heads=2)
    _, (conv_state, delta_state) = layer(torch.randn(3, 5, 32))
    assert conv_state.shape == (3, 3, 2 * 32 + 64) and delta_state.shape == (3, 2, 16, 32)
    layer = MinGRU(32)
    y, (conv_state, h) = layer(torch.randn(3, 5, 32))
    assert y.shape == (3, 5, 32) and conv_state.shape == (3, 3, 32) and h.shape == (3, 48)
    assert MinLSTM(32, expansion=1.0, conv_kernel=0).out_proj is None


@pytest.mark.parametrize("n_groups", [1, 2, "mamba3", "mamba3-mimo"])
def test_mamba2_fused_gated_norm_matches_the_unfused_form(n_groups, monkeypatch):
    """The output stage by gated_head_norm(gate_before_norm=True) equals the former y * silu(z), then the grouped
    RMSNorm module, in float64: output, state and every gradient (issue 20); Mamba-3's (one group) the same."""
    torch.manual_seed(3)
    module = mamba2_module if isinstance(n_groups, int) else mamba3_module
    layer = (Mamba2(D_MODEL, d_state=8, head_dim=8, n_groups=n_groups, chunk_size=8) if module is mamba2_module
             else Mamba3(D_MODEL, d_state=8, head_dim=8, chunk_size=8, mimo_rank=2 if "mimo" in n_groups else 1))
    layer = layer.to(F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = make_input(4, 19)
    fused = forward_and_grads(layer, x)

    def unfused(h, o, weight, bias, eps, *, kind, gate, gate_before_norm):
        assert (kind, gate, gate_before_norm) == ("rms", "silu", True)
        return layer.norm((h.flatten(-2) * torch.nn.functional.silu(o)).unflatten(-1, h.shape[-2:]))

    monkeypatch.setattr(module, "gated_head_norm", unfused)
    before = forward_and_grads(layer, x)
    torch.testing.assert_close(fused[0], before[0], rtol=1e-12, atol=1e-12)
    for got, expected in zip(fused[1], before[1]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert fused[2].keys() == before[2].keys()
    for name in before[2]:
        torch.testing.assert_close(fused[2][name], before[2][name], rtol=1e-12, atol=1e-12, msg=name)
