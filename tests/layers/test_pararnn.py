"""ParaGRU / ParaLSTM layers: the Newton forward equals the layer's own sequential loop (float64), prefill + steps
equal one forward, gradients match autograd through the loop, the solver's record is exposed, the kinds are wired."""

from __future__ import annotations

import pytest
import torch

from revival.layers.pararnn import ParaGRU, ParaLSTM
from revival.ops.newton import sequential_solve
from tests.layers._helpers import prefill_then_steps

F64 = torch.float64


def _sequential(layer, x, state=None):
    B, T, _ = x.shape
    pre = layer.in_proj(x).view(B, T, 3, layer.d_inner) + layer.gate_bias
    h0 = torch.zeros((B, layer.d_inner, *layer.state_tail), dtype=F64) if state is None else state
    h = sequential_solve(layer.cell, pre, h0, layer._weights())
    y = layer._output(h)
    return (y if layer.out_proj is None else layer.out_proj(y)), h[:, -1]


@pytest.mark.parametrize("layer_class", [ParaGRU, ParaLSTM])
@pytest.mark.parametrize("method", ["deer", "quasi", "elk"])
def test_forward_and_gradients_match_the_loop(layer_class, method):
    torch.manual_seed(0)
    layer = layer_class(8, expansion=1.5, method=method).double()
    x = torch.randn(2, 19, 8, dtype=F64, requires_grad=True)
    y, state = layer(x)
    assert layer.last_result.converged and not layer.last_result.fell_back
    want_y, want_state = _sequential(layer, x)
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-10)
    torch.testing.assert_close(state, want_state, rtol=0, atol=1e-10)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad(y.square().sum(), params)
    want = torch.autograd.grad(want_y.square().sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layer_class", [ParaGRU, ParaLSTM])
def test_prefill_then_steps_equal_one_forward(layer_class):
    torch.manual_seed(1)
    layer = layer_class(6).double()
    x = torch.randn(2, 9, 6, dtype=F64)
    whole, final = layer(x)
    y, state = prefill_then_steps(layer, x, 5)
    torch.testing.assert_close(y, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=0, atol=1e-12)


def test_fixed_iterations_are_reported():
    torch.manual_seed(2)
    layer = ParaLSTM(8, max_iters=1, tol=1e-14, on_failure="return").double()
    layer(torch.randn(1, 40, 8, dtype=F64) * 3)
    assert layer.last_result.iterations == 1 and not layer.last_result.converged


def test_options_are_validated():
    with pytest.raises(ValueError, match="method"):
        ParaGRU(8, method="newton")
    with pytest.raises(ValueError, match="on_failure"):
        ParaGRU(8, on_failure="ignore")
    with pytest.raises(ValueError, match="state"):
        ParaLSTM(8)(torch.randn(1, 3, 8), torch.zeros(1, 8))


def test_presets_build_models():
    from revival.models import LanguageModel, preset_config

    for preset, letter in (("paragru", "G"), ("paralstm", "L")):
        config = preset_config(preset, d_model=16, num_heads=2, num_blocks=2, vocab_size=32)
        assert config.pattern == letter * 2
        logits = LanguageModel(config)(torch.randint(0, 32, (1, 7)))[0]
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("layer_class", [ParaGRU, ParaLSTM])
@pytest.mark.parametrize("with_state", [False, True])
def test_packed_documents_equal_separate_calls(layer_class, with_state):
    """document_starts: outputs, final states and gradients (input, parameters, initial state) of a packed row equal
    separate calls per document (1-token documents, starts at t = 0), with the layer's default (exact) solve."""
    from tests.ops.test_varlen import LAYOUTS, T, check_packed

    torch.manual_seed(3)
    layer = layer_class(6, expansion=1.5).double()
    x = torch.randn(len(LAYOUTS), T, 6, dtype=F64)
    state = None
    if with_state:
        state = torch.randn(len(LAYOUTS), layer.d_inner, *layer.state_tail, dtype=F64) * 0.5

    def run(time_inputs, shared, state, starts):
        return layer(time_inputs[0], state, document_starts=starts)
    check_packed(run, [x], [1], [], 1, initial_state=state, parameters=list(layer.parameters()))
    assert not layer.last_result.fell_back
