"""Copy, cast and fill passes over activations in a training step of the Mamba-2, Gated DeltaNet and Mamba-3 layers.

At 2k context the 125M training step is GPU-bound, so every avoidable full pass over an activation is time (issue 20).
`count_passes` runs one layer forward and backward under bf16 autocast on the paths the GPU takes (the Triton ops and
fused kernels forced, under TRITON_INTERPRET=1 here, with the kernel launches themselves skipped: only the glue
around them runs; the concatenated products of >= 256 rows) inside a TorchDispatchMode and records, per direction,
each aten op that copies, casts, concatenates or fills a tensor whose leading dims are (batch, T), with its elements
per token. Which ops run does not depend on the shape; each expected one below names where it comes from, so a new
copy (or a wider one) fails here. `python tests/layers/test_layer_passes.py [layer]` prints them with their shapes.
"CPU only": a pass the GPU does not take (F.rms_norm's CPU form casts around its float32 math; under the
interpreter 16-bit kernel outputs are float32 buffers, `revival.ops.mamba3.glue_triton._empty`).
"""

from __future__ import annotations

import collections
import importlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import revival.layers.linear as linear_module
import revival.ops._triton as triton_helpers
import revival.ops.conv as conv_ops
from revival.layers.gated_deltanet import GatedDeltaNet
from revival.layers.mamba2 import Mamba2
from revival.layers.mamba3 import Mamba3

interpreter = pytest.importorskip("triton.runtime.interpreter")

COPY_OPS = ("clone", "copy_", "_to_copy", "cat", "stack", "repeat", "zeros", "zeros_like", "fill_", "new_zeros",
            "index_select", "constant_pad_nd")
BATCH, T, D_MODEL = 2, 16, 48
LAYERS = {
    "mamba2": lambda: Mamba2(D_MODEL, d_state=16, head_dim=16, chunk_size=16),
    "gated-deltanet": lambda: GatedDeltaNet(D_MODEL, num_heads=2, chunk_size=16),
    "mamba3": lambda: Mamba3(D_MODEL, d_state=16, head_dim=16, chunk_size=16),
}


class _CopyCounter(TorchDispatchMode):
    """Records (op, elements per token, description) of each copy-like op writing a (BATCH, T, ...) tensor."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        first = out[0] if isinstance(out, (tuple, list)) else out
        if name in COPY_OPS and isinstance(first, torch.Tensor) and tuple(first.shape[:2]) == (BATCH, T):
            inputs = [a for a in (args[0] if name in ("cat", "stack") else args) if isinstance(a, torch.Tensor)]
            described = ", ".join(f"{str(a.dtype)[6:]}{tuple(a.shape)}" for a in inputs)
            self.ops.append((name, first.numel() // (BATCH * T),
                             f"{name}({described}) -> {str(first.dtype)[6:]}{tuple(first.shape)}"))
        return out


def _gpu_paths(monkeypatch) -> None:
    """The ops' "auto" choices as on CUDA: Triton kernels and fused passes, the concatenated products."""
    if not triton_helpers.INTERPRET or not triton_helpers.HAVE_TRITON:
        pytest.skip("needs triton with TRITON_INTERPRET=1 (the CI's setting)")
    resolve = triton_helpers.resolve_impl
    monkeypatch.setattr(triton_helpers, "resolve_impl", lambda impl, tensor, fits, impls: (
        "triton" if impl == "auto" and fits else resolve(impl, tensor, fits, impls)))
    monkeypatch.setattr(conv_ops, "_resolve_impl", lambda impl, x, needs_grad: "triton")
    for name in ("l2_norm", "gated_head_norm", "swiglu"):
        monkeypatch.setattr(importlib.import_module(f"revival.ops.fused.{name}"), "use_fused_kernel",
                            lambda impl, supported, worth_it, why_not: impl != "reference" and supported)
    monkeypatch.setattr(linear_module, "FUSE_MIN_ROWS", 1)
    # the kernels themselves are skipped: their launches are no torch ops, and their values decide no op here
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", lambda self, *args, **kwargs: None)


def count_passes(name: str) -> dict[str, list[tuple[str, int, str]]]:
    """The copy-like ops of one forward and one backward of layer `name` (bf16 autocast, GPU paths set)."""
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(BATCH, T, D_MODEL, requires_grad=True)
    counter = _CopyCounter()
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = layer(x)
        forward = list(counter.ops)
        grad = torch.randn_like(y)
        counter.ops.clear()
        torch.autograd.backward(y, grad)
    return {"forward": forward, "backward": list(counter.ops)}


# (op, elements per token) -> count. Widths at the test shapes: d_model 48; Mamba-2 and Mamba-3 d_inner 96, 6 heads;
# Mamba-2 B and C 16 each; Gated DeltaNet 2 heads, q and k 48, v and gate 96.
EXPECTED = {
    "mamba2": {  # the gated norm is one fused kernel each way: no float32 copies around it
        "forward": {("_to_copy", 48): 1},  # x to bf16 for in_proj (autocast)
        "backward": {("_to_copy", 6): 1,  # dt's gradient to dt_raw's bf16
                     ("cat", 230): 1,  # the in_proj output's split: z, x, B, C, dt gradients
                     ("_to_copy", 48): 1},  # x's gradient to float32 (autocast)
    },
    "gated-deltanet": {
        "forward": {("_to_copy", 48): 1,  # x to bf16 for the products (autocast)
                    ("clone", 2): 1,  # b contiguous for beta's sigmoid
                    ("_to_copy", 2): 1},  # beta to float32 for the kernels
        "backward": {("_to_copy", 2): 2,  # the gradients of a and b to bf16
                     ("cat", 4): 1,  # the a|b product's split
                     ("cat", 288): 1,  # the q|k|v|gate product's split
                     ("_to_copy", 48): 1},  # x's gradient to float32 (autocast)
    },
    "mamba3": {
        "forward": {("_to_copy", 48): 1,  # x to bf16 for in_proj (autocast)
                    ("_to_copy", 16): 4,  # CPU only: B's and C's RMSNorm
                    ("_to_copy", 8): 1,  # theta to dt's float32
                    ("_to_copy", 192): 1,  # CPU only: the two-head SSD input
                    ("repeat", 12): 1,  # dt for SSD's 2H heads
                    ("_to_copy", 96): 1},  # CPU only: the heads' combined output (the gated norm is one fused kernel)
        "backward": {("_to_copy", 96): 2,  # CPU only: two x gradients
                     ("_to_copy", 192): 1,  # CPU only: the two-head output's gradient
                     ("_to_copy", 6): 2,  # the gradients of dt_raw and lam_raw to bf16
                     ("_to_copy", 8): 1,  # theta's gradient to bf16 (summed over heads in float32 before)
                     ("_to_copy", 16): 6,  # CPU only: B's and C's RMSNorm
                     ("cat", 244): 1,  # the in_proj output's split
                     ("_to_copy", 48): 1},  # x's gradient to float32 (autocast)
    },
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_copy_passes_per_layer(name, monkeypatch):
    _gpu_paths(monkeypatch)
    got = count_passes(name)
    for direction, ops in got.items():
        tally = dict(collections.Counter((op, width) for op, width, _ in ops))
        listing = "\n".join(described for _, _, described in ops)
        assert tally == EXPECTED[name][direction], f"{name} {direction}: {tally}\n{listing}"


if __name__ == "__main__":
    with pytest.MonkeyPatch.context() as patch:
        _gpu_paths(patch)
        for layer_name in sys.argv[1:] or LAYERS:
            for direction, ops in count_passes(layer_name).items():
                print(f"{layer_name} {direction}: {dict(collections.Counter((op, w) for op, w, _ in ops))}")
                for _, _, described in ops:
                    print("   ", described)
