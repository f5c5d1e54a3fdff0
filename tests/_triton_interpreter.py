"""Two speedups of Triton's CPU interpreter for the tests, installed by tests/conftest.py; kernel code is unchanged and
results are bit-identical (tests/test_triton_interpreter.py checks both against the interpreter's own code).

- `tl.associative_scan` with a user combine function (every scan in revival.ops: linear recurrences, the mLSTM
  stabilizer, Newton's 2x2 blocks) runs one element at a time there, a Python call per element: ~90% of an
  interpreted mLSTM forward + backward. Combine functions are elementwise, so `sliced_generic_scan` applies the
  combine to whole slices, one position of the scan axis at a time: the same sequential order and float operations.
- Every call of a `@triton.jit` device function (a helper called from a kernel) re-patches triton.language for the
  interpreter (inspect.getmembers over tl, tl.core, tl.math: ~10% of the interpreted conv backward). The kernel
  launch around it has already patched those modules, and keeps them patched until it ends, so `patch_lang_once`
  skips the device function's patching when its language modules are among the launch's.
"""

from __future__ import annotations

import inspect

import numpy as np


def sliced_generic_scan(self, input):
    """Replacement for triton.runtime.interpreter.ScanOps.generic_scan (`self` a ScanOps, `input` its tl tensors)."""
    import triton.language as tl

    datas = [arg.handle.data for arg in input]
    shape = datas[0].shape
    outputs = [np.zeros(shape, dtype=d.dtype) for d in datas]

    def at(k):
        return (slice(None),) * self.axis + (k,) + (slice(None),) * (len(shape) - self.axis - 1)

    for out, data in zip(outputs, datas):
        out[at(0)] = data[at(0)]
    for k in range(1, shape[self.axis]):
        acc = tuple(self.to_tensor(o[at(k - 1)], arg.dtype) for o, arg in zip(outputs, input))
        cur = tuple(self.to_tensor(d[at(k)], arg.dtype) for d, arg in zip(datas, input))
        ret = self.combine_fn.fn(*acc, *cur)
        ret = ret if isinstance(ret, tuple) else (ret,)
        for out, value in zip(outputs, ret):
            value = value.handle.data if isinstance(value, tl.core.tensor) else value
            out[at(k)] = np.reshape(value, out[at(k)].shape) if np.ndim(value) else value
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outputs, input)]


_launches: list[set[int]] = []  # ids of the language modules patched by the kernel launch running now


def _language_modules(fn) -> set[int]:
    import triton.language as tl

    return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}


def patch_lang_once(fn):
    """Replacement for triton.runtime.interpreter._patch_lang: a kernel launch (no launch running) patches as before
    and is remembered until its scope is restored; a device function called inside it whose language modules the
    launch patched gets an empty scope (the interpreter never restores a device function's scope)."""
    from triton.runtime import interpreter

    modules = _language_modules(fn)
    if _launches and modules <= _launches[-1]:
        return interpreter._LangPatchScope()
    scope = interpreter.interpreter_patch_lang(fn)
    if _launches:  # a device function reaching other modules: patched as by the interpreter, nothing to track
        return scope
    _launches.append(modules)
    restore = scope.restore

    def restore_and_forget():
        _launches.pop()
        restore()

    scope.restore = restore_and_forget
    return scope


def install() -> bool:
    """Put both replacements in place; False (nothing changed) when this Triton lacks either original (then the tests
    run on the interpreter's own, slower code)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not (callable(getattr(interpreter.ScanOps, "generic_scan", None)) and callable(
            getattr(interpreter, "_patch_lang", None)) and hasattr(interpreter, "_LangPatchScope")):
        return False
    if interpreter.ScanOps.generic_scan is not sliced_generic_scan:
        interpreter.ScanOps.interpreter_generic_scan = interpreter.ScanOps.generic_scan  # kept for the tests
        interpreter.ScanOps.generic_scan = sliced_generic_scan
    if interpreter._patch_lang is not patch_lang_once:
        interpreter.interpreter_patch_lang = interpreter._patch_lang
        interpreter._patch_lang = patch_lang_once
    return True
