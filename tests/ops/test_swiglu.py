"""swiglu: the Triton pass (under TRITON_INTERPRET=1 on CPU) against the float64 formula, and the SwiGLU layer on it."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.layers import SwiGLU  # noqa: E402
from revival.ops.fused.swiglu import swiglu, swiglu_reference  # noqa: E402

swiglu_module = importlib.import_module("revival.ops.fused.swiglu")  # the module, not the function of that name

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_float64_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(0)
    F_half = 700  # a tail tile in the feature direction; 11 rows: a tail tile in the row direction
    packed = torch.randn(11, 3 * F_half, generator=g) * 4  # gate, up and a third block: gate_up is a strided view
    packed[0, :3] = torch.tensor([0.0, -30.0, 30.0])
    dout = torch.randn(11, F_half, generator=g)
    source = packed.to(dtype).to(DEVICE).clone().requires_grad_(True)
    y = swiglu(source[:, :2 * F_half], impl="triton")
    assert type(y.grad_fn).__name__ == "_SwiGLUFunctionBackward"  # the kernel path ran
    y.backward(dout.to(dtype).to(DEVICE))
    source64 = packed.to(dtype).double().clone().requires_grad_(True)
    y64 = swiglu_reference(source64[:, :2 * F_half])
    y64.backward(dout.to(dtype).double())
    assert y.dtype == dtype and y.shape == (11, F_half) and source.grad.dtype == dtype
    # float32 math rounded once to dtype: within one rounding of the terms' magnitude. d gate's factor
    # 1 + gate (1 - sigmoid(gate)) cancels near gate = -1.28, so its bound is on the terms, not the result; exp(-gate)
    # carries the float32 rounding of its argument, a relative error of ~|gate| float32 eps (GPU exp is exp2-based).
    finfo = torch.finfo(dtype)
    tiny = finfo.eps * finfo.smallest_normal  # the subnormals' spacing
    gate, up = source64.detach()[:, :F_half], source64.detach()[:, F_half:2 * F_half]
    sig, dout64 = torch.sigmoid(gate), dout.to(dtype).double()
    relative = finfo.eps + 4 * torch.finfo(torch.float32).eps * (1 + gate.abs())
    assert ((y.double().cpu() - y64).abs() <= relative * y64.abs() + tiny).all()
    grad, grad64 = source.grad.double().cpu(), source64.grad
    assert torch.equal(grad[:, 2 * F_half:], torch.zeros_like(grad[:, 2 * F_half:]))
    gate_terms = (dout64 * up * sig).abs() * (1 + gate.abs() * (1 - sig))
    assert ((grad[:, :F_half] - grad64[:, :F_half]).abs() <= 2 * relative * gate_terms + tiny).all()
    up_grad64 = grad64[:, F_half:2 * F_half]
    assert ((grad[:, F_half:2 * F_half] - up_grad64).abs() <= relative * up_grad64.abs() + tiny).all()


def test_small_inputs_take_the_formula_and_odd_widths_are_refused():
    x = torch.randn(3, 8)
    assert torch.equal(swiglu(x), swiglu_reference(x))
    with pytest.raises(ValueError, match=r"gate_up: expected an even last dim.*\(3, 7\)"):
        swiglu(torch.randn(3, 7))


def test_swiglu_layer_on_the_kernel_matches_separate_products():
    """The layer (one product of the concatenated weights, then the kernel) against silu(gate(x)) * up(x) in float64."""
    torch.manual_seed(0)
    hidden = -(-swiglu_module.KERNEL_MIN_ELEMENTS // 300)  # 300 rows x hidden: "auto" takes the kernel
    layer = SwiGLU(32, hidden).to(DEVICE)
    x = torch.randn(2, 150, 32, device=DEVICE, requires_grad=True)  # 300 rows: the concatenated product
    y = layer(x)
    y.square().sum().backward()
    layer64 = SwiGLU(32, hidden).double()
    layer64.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_(True)
    y64 = layer64.proj_down(torch.nn.functional.silu(layer64.proj_up_gate(x64)) * layer64.proj_up(x64))
    y64.square().sum().backward()
    relative_error = lambda a, ref: ((a.double().cpu() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert "_SwiGLUFunctionBackward" in _graph_node_names(y.grad_fn)
    assert relative_error(y, y64) < 1e-6
    assert relative_error(x.grad, x64.grad) < 1e-6
    for name, p in layer.named_parameters():
        assert relative_error(p.grad, dict(layer64.named_parameters())[name].grad) < 1e-6, name


def _graph_node_names(node) -> set[str]:
    seen, stack = {}, [node]  # id -> node: holding the Python wrappers keeps their ids from being reused
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen.values()}
