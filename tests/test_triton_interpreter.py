"""tests/_triton_interpreter.py against the interpreter's own code: the scan by slices equals the per-element scan bit
for bit, on every combine function revival.ops scans with, along both axes of a tile, forward and reverse; device
functions patched once per launch give the same results and leave triton.language as it was."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the `triton` package is not installed (pip install 'revival[gpu]')")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("checks Triton's CPU interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402
from triton.runtime.interpreter import ScanOps  # noqa: E402

from revival.ops._triton import linear_recurrence_combine  # noqa: E402
from revival.ops.mlstm.triton.forward import _max_plus  # noqa: E402
from revival.ops.newton.triton.scan import _combine_block2  # noqa: E402
from tests import _triton_interpreter  # noqa: E402
from tests._triton_interpreter import patch_lang_once, sliced_generic_scan  # noqa: E402


@triton.jit
def _scan_kernel(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr, AXIS: tl.constexpr, REVERSE: tl.constexpr,
                 COMBINE: tl.constexpr):
    """Scans the (R, C) tiles x[j] (6 of them, float32) along AXIS into y with the combine numbered COMBINE."""
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    a = tl.load(x_ptr + offs)
    b = tl.load(x_ptr + R * C + offs)
    if COMBINE == 0:
        a, b = tl.associative_scan((a, b), AXIS, linear_recurrence_combine, reverse=REVERSE)
    elif COMBINE == 1:
        a, b = tl.associative_scan((a, b), AXIS, _max_plus, reverse=REVERSE)
    else:
        c = tl.load(x_ptr + 2 * R * C + offs)
        d = tl.load(x_ptr + 3 * R * C + offs)
        e = tl.load(x_ptr + 4 * R * C + offs)
        f = tl.load(x_ptr + 5 * R * C + offs)
        a, b, c, d, e, f = tl.associative_scan((a, b, c, d, e, f), AXIS, _combine_block2, reverse=REVERSE)
        tl.store(y_ptr + 2 * R * C + offs, c)
        tl.store(y_ptr + 3 * R * C + offs, d)
        tl.store(y_ptr + 4 * R * C + offs, e)
        tl.store(y_ptr + 5 * R * C + offs, f)
    tl.store(y_ptr + offs, a)
    tl.store(y_ptr + R * C + offs, b)


def _scan(scan_impl, x, axis, reverse, combine, monkeypatch):
    monkeypatch.setattr(ScanOps, "generic_scan", scan_impl)
    y = torch.zeros_like(x)
    _scan_kernel[(1,)](x, y, R=x.shape[1], C=x.shape[2], AXIS=axis, REVERSE=reverse, COMBINE=combine)
    return y


@pytest.mark.parametrize("combine", [0, 1, 2], ids=["linear_recurrence", "max_plus", "block2"])
def test_sliced_scan_equals_the_interpreters_loop(combine, monkeypatch):
    """Decays near 1 and values of mixed sign and size, so that the float32 order of operations shows in the bits."""
    assert ScanOps.generic_scan is sliced_generic_scan  # tests/conftest.py installed it
    original = ScanOps.interpreter_generic_scan
    g = torch.Generator().manual_seed(combine)
    x = torch.randn(6, 8, 4, generator=g) * torch.logspace(-3, 3, 4)
    x[0] = 0.9 + 0.1 * torch.rand(8, 4, generator=g)
    for axis in (0, 1):
        for reverse in (False, True):
            want = _scan(original, x, axis, reverse, combine, monkeypatch)
            got = _scan(sliced_generic_scan, x, axis, reverse, combine, monkeypatch)
            assert torch.equal(got, want), (axis, reverse)
            assert not torch.equal(want, x), (axis, reverse)  # the scan changed the tile


@triton.jit
def _twice_plus(x, c):
    return 2.0 * x + c


@triton.jit
def _device_calls_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    for c in tl.static_range(3):  # three device-function calls in one launch
        x = _twice_plus(x, c)
    tl.store(y_ptr + offs, tl.exp(x * 0.1))


def test_device_functions_patch_once_per_launch(monkeypatch):
    """One patching of triton.language per launch (the interpreter's: one per launch and per device-function call),
    the same results, and tl as it was once the launch is over."""
    assert interpreter._patch_lang is patch_lang_once  # tests/conftest.py installed it
    patches = []
    patch_core = interpreter._patch_lang_core
    monkeypatch.setattr(interpreter, "_patch_lang_core", lambda *a: patches.append(a) or patch_core(*a))
    before = (tl.exp, tl.core.tensor.__add__, tl.associative_scan)
    x = torch.randn(16, generator=torch.Generator().manual_seed(0))
    results, counts = {}, {}
    for name, patch in (("interpreter", interpreter.interpreter_patch_lang), ("once", patch_lang_once)):
        monkeypatch.setattr(interpreter, "_patch_lang", patch)
        patches.clear()
        results[name] = torch.zeros_like(x)
        _device_calls_kernel[(1,)](x, results[name], N=16)
        counts[name] = len(patches)
    assert torch.equal(results["once"], results["interpreter"])
    assert torch.allclose(results["once"], torch.exp(0.1 * (8 * x + 4)))  # ((2x) * 2 + 1) * 2 + 2
    assert counts["interpreter"] == 4 * counts["once"] > 0  # the launch and 3 device calls, or the launch alone
    assert _triton_interpreter._launches == []
    assert (tl.exp, tl.core.tensor.__add__, tl.associative_scan) == before
