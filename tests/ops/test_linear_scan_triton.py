"""The fused Triton scans (revival.ops.linear_scan.triton) against the float64 reference loops: forward, gradients
(inputs, h0, weights) and the layers' fused path.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set before Triton is imported) at small shapes, with small
tiles so that several time tiles (the last one partial) and several channel blocks (the last one partial) are used.
Full-shape checks on the GPU: benchmarks/gpu_scan.py.
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # before triton is imported: the interpreter is chosen when the kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed")

from revival.layers.mingru import MinGRU  # noqa: E402
from revival.layers.minlstm import MinLSTM  # noqa: E402
from revival.ops.linear_scan import (  # noqa: E402
    linear_recurrence_reference,
    mingru_scan,
    minlstm_scan,
    resolve_impl,  # noqa: E402
)
from revival.ops.linear_scan import triton as ts  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# the interpreter evaluates sigmoid(x) = 1 / (1 + exp(-x)) in numpy: exp overflows to inf for saturated gates (-> 0)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
F64 = torch.float64
B, T, D = 2, 21, 20  # tiles of 8 steps x 16 channels: 3 time tiles (last partial), 2 channel blocks (last partial)
SMALL = ts.LaunchConfig(block_t=8, block_d=16, backward_block_t=8, backward_block_d=16)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _linear_reference(a, b, h0):
    return linear_recurrence_reference(torch.log(a), b, h0)


CASES = {  # name: (fast, reference, number of (B, T, D) inputs)
    "linear": (partial(ts.linear_recurrence_triton, launch=SMALL), _linear_reference, 2),
    "mingru": (partial(ts.mingru_scan_triton, launch=SMALL),
               lambda g, x, h0: mingru_scan(g, x, h0, impl="reference"), 2),
    "minlstm": (partial(ts.minlstm_scan_triton, launch=SMALL),
                lambda f, i, x, h0: minlstm_scan(f, i, x, h0, impl="reference"), 3),
}


def _inputs(name: str, n: int, seed: int, scale: float = 2.0) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, D, generator=gen, dtype=F64) * scale for _ in range(n)]
    if name == "linear":
        xs[0] = torch.rand(B, T, D, generator=gen, dtype=F64) * 0.98 + 0.01  # a in (0, 1)
    return xs, torch.randn(B, D, generator=gen, dtype=F64)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_h0", [True, False])
def test_scan_forward_and_gradients_match_float64(name, with_h0):
    fast, reference, n = CASES[name]
    xs, h0 = _inputs(name, n, seed=len(name) + 10 * with_h0)
    h0 = h0 if with_h0 else None
    leaves64 = [x.clone().requires_grad_() for x in xs] + ([h0.clone().requires_grad_()] if with_h0 else [])
    leaves32 = [x.detach().float().to(DEVICE).requires_grad_() for x in leaves64]
    h_ref, last_ref = reference(*leaves64[:n], leaves64[n] if with_h0 else None)
    weight = torch.randn(h_ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    ((h_ref * weight).sum() + 3 * last_ref.sum()).backward()

    h, last = fast(*leaves32[:n], leaves32[n] if with_h0 else None)
    assert h.dtype == torch.float32 and last.dtype == torch.float32
    ((h * weight.float().to(DEVICE)).sum() + 3 * last.sum()).backward()
    assert rel_err(h, h_ref) < 1e-5
    assert rel_err(last, last_ref) < 1e-5
    for fast_leaf, ref_leaf in zip(leaves32, leaves64):
        assert rel_err(fast_leaf.grad, ref_leaf.grad) < 1e-5


def test_saturated_gates_and_strided_bfloat16_inputs():
    xs, h0 = _inputs("minlstm", 3, seed=3, scale=40.0)  # sigmoids saturate, huge htilde
    h_ref, _ = minlstm_scan(*xs, h0, impl="reference")
    h, _ = ts.minlstm_scan_triton(*(x.float().to(DEVICE) for x in xs), h0.float().to(DEVICE), launch=SMALL)
    assert rel_err(h, h_ref) < 1e-5
    # bfloat16 views of one projection output (strided, as the layer's chunks): h in bfloat16, h_last float32
    packed = torch.cat(xs[:2], dim=-1).to(DEVICE, torch.bfloat16) / 20
    gate, hidden = packed.chunk(2, dim=-1)
    h_ref, last_ref = mingru_scan(gate.double().cpu(), hidden.double().cpu(), impl="reference")
    h, last = mingru_scan(gate, hidden, impl="triton")
    assert h.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert rel_err(h, h_ref) < 1e-2 and rel_err(last, last_ref) < 1e-5


@pytest.mark.parametrize("layer_cls", [MinGRU, MinLSTM])
def test_layer_triton_path_matches_float64_reference(layer_cls):
    """The layer's Triton path (cuBLAS in-projection + the scan kernel), with bias, conv, out-projection and h0, in
    float32 against the same layer in float64 with the reference loop; gradients of every parameter, of x and of the
    state."""
    torch.manual_seed(0)
    ref = layer_cls(12, expansion=1.5, conv_kernel=3, bias=True, scan_impl="reference").double()
    with torch.no_grad():
        ref.in_proj.bias.normal_()
    fast = layer_cls(12, expansion=1.5, conv_kernel=3, bias=True, scan_impl="triton")
    fast.load_state_dict(ref.state_dict())
    fast = fast.float().to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, 12, generator=gen, dtype=F64)
    state = (torch.randn(B, 2, 12, generator=gen, dtype=F64), torch.randn(B, 18, generator=gen, dtype=F64))
    x64, h0_64 = x.clone().requires_grad_(), state[1].clone().requires_grad_()
    x32, h0_32 = x.float().to(DEVICE).requires_grad_(), state[1].float().to(DEVICE).requires_grad_()
    y_ref, (_, last_ref) = ref(x64, (state[0], h0_64))
    y, (_, last) = fast(x32, (state[0].float().to(DEVICE), h0_32))
    weight = torch.randn(y_ref.shape, generator=gen, dtype=F64)
    ((y_ref * weight).sum() + last_ref.sum()).backward()
    ((y * weight.float().to(DEVICE)).sum() + last.sum()).backward()
    assert rel_err(y, y_ref) < 1e-5 and rel_err(last, last_ref) < 1e-5
    assert rel_err(x32.grad, x64.grad) < 1e-5 and rel_err(h0_32.grad, h0_64.grad) < 1e-5
    for (name, p_fast), p_ref in zip(fast.named_parameters(), ref.parameters()):
        assert rel_err(p_fast.grad, p_ref.grad) < 1e-5, name


def test_auto_picks_triton_only_on_cuda_and_errors_name_the_argument():
    x = torch.randn(1, 3, 4)
    assert resolve_impl("auto", x) == "log" and resolve_impl("auto", x.double()) == "log"
    if ON_GPU:
        assert resolve_impl("auto", x.cuda()) == "triton"
    with pytest.raises(ValueError, match="^gate:"):
        ts.mingru_scan_triton(x.double(), x.double())
    with pytest.raises(ValueError, match="^hidden:"):
        ts.mingru_scan_triton(x, x[:, :2])
    with pytest.raises(ValueError, match="^h0:"):
        ts.linear_recurrence_triton(x, x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="^launch:"):
        ts.linear_recurrence_triton(x, x, launch={"block_t": 8})
