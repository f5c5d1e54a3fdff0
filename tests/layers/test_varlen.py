"""Every layer on packed rows (`document_starts`) equals the layer on each document alone (float64): outputs, final
states (every document's), gradients of the input, the initial state and all parameters. The harness is
tests/ops/test_varlen.py's `check_packed`; its layouts put documents on chunk edges (chunk size 8) and 1-token ones."""

from __future__ import annotations

import pytest
import torch

from revival.layers import (
    Attention,
    CausalConv1d,
    GatedDeltaNet,
    Mamba2,
    MinGRU,
    MinLSTM,
    MLSTMLayer,
    SLSTMLayer,
    XLSTMLargeLayer,
)
from revival.ops._documents import from_attention_mask, from_lengths
from tests.ops.test_varlen import LAYOUTS, T, _as_tuple, check_packed

D_MODEL = 16

LAYERS = {
    "mlstm": lambda: MLSTMLayer(D_MODEL, num_heads=2, proj_factor=2.0, conv_kernel=4, qkv_block_size=4, chunk_size=8,
                                impl="chunkwise"),
    "slstm": lambda: SLSTMLayer(D_MODEL, num_heads=2, conv_kernel=4, impl="fused"),
    "slstm-noconv": lambda: SLSTMLayer(D_MODEL, num_heads=2, conv_kernel=0, impl="reference"),
    "xlstm-large": lambda: XLSTMLargeLayer(D_MODEL, num_heads=2, chunk_size=8, impl="chunkwise"),
    "mingru": lambda: MinGRU(D_MODEL, chunk_size=8),
    "minlstm": lambda: MinLSTM(D_MODEL, chunk_size=8),
    "mamba2": lambda: Mamba2(D_MODEL, d_state=8, head_dim=8, n_groups=2, chunk_size=8),
    "gated-deltanet": lambda: GatedDeltaNet(D_MODEL, num_heads=2, head_dim=8, chunk_size=8),
}


def _unflatten(template, flat):
    """Rebuild a nested state like `template` from the flat list of its tensors."""
    flat = iter(flat)

    def build(part):
        if isinstance(part, (tuple, list)):
            return type(part)(build(p) for p in part)
        return next(flat)
    return build(template)


def _layer_and_input(name, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[name]().double()
    with torch.no_grad():  # non-trivial biases and skip weights, so that every parameter has a gradient to compare
        for parameter in layer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    x = torch.randn(len(LAYOUTS), T, D_MODEL, dtype=torch.float64)
    return layer, x


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_packed_equals_separate(name):
    layer, x = _layer_and_input(name)

    def run(time_inputs, shared, state, starts):
        return layer(time_inputs[0], None, document_starts=starts)
    check_packed(run, [x], [1], [], 1, parameters=list(layer.parameters()), cut_states=False)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_packed_with_initial_state(name):
    layer, x = _layer_and_input(name, seed=1)
    with torch.no_grad():
        _, template = layer(torch.randn(len(LAYOUTS), 5, D_MODEL, dtype=torch.float64))

    def run(time_inputs, shared, state, starts):
        return layer(time_inputs[0], None if state is None else _unflatten(template, state), document_starts=starts)
    check_packed(run, [x], [1], [], 1, initial_state=template, parameters=list(layer.parameters()),
                 cut_states=name in ("mlstm", "mamba2"))


def test_causal_conv_packed_equals_separate():
    torch.manual_seed(0)
    conv = CausalConv1d(6, kernel_size=4, activation="silu").double()
    x = torch.randn(len(LAYOUTS), T, 6, dtype=torch.float64)
    state = torch.randn(len(LAYOUTS), 3, 6, dtype=torch.float64)

    def run(time_inputs, shared, initial, starts):
        return conv(time_inputs[0], initial, document_starts=starts)
    check_packed(run, [x], [1], [], 1, parameters=list(conv.parameters()))
    check_packed(run, [x], [1], [], 1, initial_state=state, parameters=list(conv.parameters()))


def test_attention_packed_equals_separate():
    torch.manual_seed(0)
    layer = Attention(D_MODEL, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(len(LAYOUTS), T, D_MODEL, dtype=torch.float64)

    def run(time_inputs, shared, state, starts):
        return layer(time_inputs[0], None, document_starts=starts)
    check_packed(run, [x], [1], [], 1, parameters=list(layer.parameters()), states=False)


@pytest.mark.parametrize("name", sorted(LAYERS) + ["attention"])
def test_left_padded_prefill_then_steps_equals_unpadded(name):
    """A left-padded row (the pad is the first document) prefilled, then decoded token by token with the returned
    state, gives the unpadded row's outputs: the state after the prompt holds nothing of the pad."""
    if name == "attention":
        torch.manual_seed(0)
        layer = Attention(D_MODEL, num_heads=4, num_kv_heads=2).double()
    else:
        layer, _ = _layer_and_input(name)
    prompt, steps, pad = 7, 4, 5
    x = torch.randn(1, prompt + steps, D_MODEL, dtype=torch.float64)
    expected, _ = layer(x, None)
    padded = torch.cat([torch.randn(1, pad, D_MODEL, dtype=torch.float64), x[:, :prompt]], dim=1)
    mask = torch.cat([torch.zeros(1, pad, dtype=torch.long), torch.ones(1, prompt, dtype=torch.long)], dim=1)
    y, state = layer(padded, None, document_starts=from_attention_mask(mask))
    torch.testing.assert_close(y[:, pad:], expected[:, :prompt], atol=1e-10, rtol=0)
    for t in range(prompt, prompt + steps):
        y, state = layer(x[:, t : t + 1], state)
        torch.testing.assert_close(y, expected[:, t : t + 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["mlstm", "slstm", "mingru", "attention"])
def test_single_token_with_a_start_drops_the_state(name):
    """A 1-token call (the layers' step path) with a start at t = 0 ignores the state passed in."""
    if name == "attention":
        torch.manual_seed(0)
        layer = Attention(D_MODEL, num_heads=4, num_kv_heads=2).double()
    else:
        layer, _ = _layer_and_input(name)
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    _, state = layer(x[:, :5])
    token = x[:, 5:6]
    fresh, _ = layer(token, None)
    y, _ = layer(token, state, document_starts=from_lengths([[1], [1]]))
    torch.testing.assert_close(y, fresh, atol=1e-10, rtol=0)
    assert _as_tuple(state)  # the state was real
