"""soft_cap: the Triton pass (16-bit tensors; under TRITON_INTERPRET=1 on CPU) against the float64 formula."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.ops.fused.soft_cap import soft_cap, soft_cap_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_float64_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 701, generator=g) * 40  # past the cap, around 0, and a tail block of the grid
    x[0, 0, :4] = torch.tensor([0.0, 1e-6, -6e4 if dtype == torch.float16 else -1e30, 6e4])
    dy = torch.randn(x.shape, generator=g)
    cap = 30.0
    x16 = x.to(dtype).to(DEVICE).requires_grad_(True)
    y = soft_cap(x16, cap, impl="triton")  # below the size "auto" gives the kernel
    assert type(y.grad_fn).__name__ == "_SoftCapFunctionBackward"  # the kernel path ran
    y.backward(dy.to(dtype).to(DEVICE))
    x64 = x.to(dtype).double().requires_grad_(True)
    y64 = soft_cap_reference(x64, cap)
    y64.backward(dy.to(dtype).double())
    assert y.dtype == dtype and x16.grad.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(x16.grad).all()
    finfo = torch.finfo(dtype)
    # one 16-bit rounding of the result (relative eps, or the subnormals' spacing)
    tolerance = lambda ref: finfo.eps * ref.abs() + finfo.eps * finfo.smallest_normal  # noqa: E731
    assert ((y.double().cpu() - y64).abs() <= tolerance(y64)).all()
    assert ((x16.grad.double().cpu() - x64.grad).abs() <= tolerance(x64.grad)).all()


def test_small_float32_and_none_take_the_formula():
    x = torch.randn(4, 8)
    assert soft_cap(x, None) is x
    assert torch.equal(soft_cap(x, 15.0), soft_cap_reference(x, 15.0))
    assert torch.equal(soft_cap(x.bfloat16(), 15.0), soft_cap_reference(x.bfloat16(), 15.0))  # below the kernel size
    with pytest.raises(ValueError, match="cap: expected a positive number"):
        soft_cap(x, 0.0)


def test_impl_is_checked_and_named():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="impl: expected one of"):
        soft_cap(x, 15.0, impl="fast")
    with pytest.raises(ValueError, match=r"impl: 'triton' cannot run here \(x: torch.float32"):
        soft_cap(x, 15.0, impl="triton")  # the kernel takes 16-bit tensors only
    assert torch.equal(soft_cap(x.bfloat16(), 15.0, impl="reference"), soft_cap_reference(x.bfloat16(), 15.0))

