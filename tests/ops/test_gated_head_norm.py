"""gated_head_norm: the Triton kernels (under TRITON_INTERPRET=1 on CPU) against the float64 PyTorch form."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported: it reads the variable once
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")

from revival.ops.fused.gated_head_norm import gated_head_norm, gated_head_norm_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gate_before_norm", [False, True])
@pytest.mark.parametrize("kind,gate", [("layer", "sigmoid"), ("rms", "silu"), ("rms", "sigmoid"), ("layer", "silu")])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("B,T,H,D", [(2, 37, 3, 24), (1, 70, 2, 64), (1, 5, 2, 300), (1, 9, 1, 1536)])
def test_kernel_matches_float64(B, T, H, D, bias, dtype, tol, kind, gate, gate_before_norm):
    g = torch.Generator().manual_seed(B * T + D)
    h = torch.randn(B, T, H, D, generator=g) * 3 + 1
    packed = torch.randn(B, T, 2 * H * D, generator=g) * 2  # o as a strided view, as the layer passes it
    weight, bias_t = torch.rand(H * D, generator=g) + 0.5, (torch.randn(H * D, generator=g) if bias else None)
    dout = torch.randn(B, T, H * D, generator=g)

    def run(h, packed, weight, bias_t, dout, fn, device):
        leaves = [x.to(device).requires_grad_(True) if x is not None else None for x in (h, packed, weight, bias_t)]
        out = fn(leaves[0], leaves[1][..., H * D:], leaves[2], leaves[3], 1e-6, kind=kind, gate=gate,
                 gate_before_norm=gate_before_norm)
        out.backward(dout.to(device).to(out.dtype))
        return [out.detach()] + [x.grad for x in leaves if x is not None]

    ref = run(h.to(dtype).double(), packed.to(dtype).double(), weight.double(),
              None if bias_t is None else bias_t.double(), dout.to(dtype).double(), gated_head_norm_reference, "cpu")
    kernel = partial(gated_head_norm, impl="triton")
    got = run(h.to(dtype), packed.to(dtype), weight, bias_t, dout.to(dtype), kernel, DEVICE)
    assert got[0].dtype == dtype and got[0].shape == (B, T, H * D)
    names = ["out", "dh", "do", "dweight"] + (["dbias"] if bias else [])
    errors = {name: _rel(a, b) for name, a, b in zip(names, got, ref)}
    assert errors["do"] >= 0 and got[2][..., : H * D].abs().max() == 0  # o's gradient lands in its own columns
    errors["do"] = _rel(got[2][..., H * D:], ref[2][..., H * D:])
    assert max(errors.values()) < tol, errors


def test_rms_silu_reference_is_the_gated_deltanet_output_stage():
    """kind "rms", gate "silu" is MultiHeadNorm(kind="rms")(h) * silu(o), the Gated DeltaNet layer's former form."""
    from revival.layers.norms import MultiHeadNorm

    g = torch.Generator().manual_seed(5)
    norm = MultiHeadNorm(3, 10, eps=1e-5, kind="rms", bias=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(30, generator=g, dtype=torch.float64) + 0.5)
        norm.bias.copy_(torch.randn(30, generator=g, dtype=torch.float64))
    h, o = torch.randn(2, 4, 3, 10, generator=g, dtype=torch.float64), torch.randn(2, 4, 30, generator=g,
                                                                                  dtype=torch.float64)
    got = gated_head_norm_reference(h, o, norm.weight, norm.bias, norm.eps, kind="rms", gate="silu")
    torch.testing.assert_close(got, norm(h) * torch.nn.functional.silu(o), rtol=1e-13, atol=1e-13)


def test_gate_before_norm_reference_is_the_mamba2_output_stage():
    """gate_before_norm with kind "rms", gate "silu" is MultiHeadNorm(kind="rms")(h * silu(o)), Mamba-2's former
    grouped RMSNorm of y * silu(z); one group (the weight inside the norm) and several."""
    from revival.layers.norms import MultiHeadNorm

    g = torch.Generator().manual_seed(6)
    for groups in (1, 3):
        norm = MultiHeadNorm(groups, 10, eps=1e-5, kind="rms").double()
        with torch.no_grad():
            norm.weight.copy_(torch.rand(groups * 10, generator=g, dtype=torch.float64) + 0.5)
        h = torch.randn(2, 4, groups, 10, generator=g, dtype=torch.float64)
        o = torch.randn(2, 4, groups * 10, generator=g, dtype=torch.float64)
        got = gated_head_norm_reference(h, o, norm.weight, None, norm.eps, kind="rms", gate="silu",
                                        gate_before_norm=True)
        expected = norm((h.flatten(-2) * torch.nn.functional.silu(o)).unflatten(-1, (groups, 10)))
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_options_are_checked():
    h, o, w = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 32), torch.ones(32)
    with pytest.raises(ValueError, match="kind: expected one of"):
        gated_head_norm(h, o, w, None, 1e-6, kind="group")
    with pytest.raises(ValueError, match="gate: expected one of"):
        gated_head_norm(h, o, w, None, 1e-6, gate="tanh")


def test_shapes_are_checked():
    h, o, w = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 32), torch.ones(32)
    with pytest.raises(ValueError, match="o: expected shape"):
        gated_head_norm(h, o[..., :16], w, None, 1e-6)
    with pytest.raises(ValueError, match="weight, bias: expected shape"):
        gated_head_norm(h, o, w[:8], None, 1e-6)
    assert gated_head_norm(h, o, w, None, 1e-6).shape == (2, 3, 32)  # CPU: the PyTorch form
