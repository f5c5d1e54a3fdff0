"""Two speedups of Triton's CPU interpreter for the tests, installed by tests/conftest.py; kernel code is unchanged and
results are bit-identical (tests/test_triton_interpreter.py checks both against the interpreter's own code).

- `tl.associative_scan` with a user combine function (every scan in revival.ops: linear recurrences, the mLSTM
  stabilizer, Newton's 2x2 blocks) runs one element at a time there, a Python call per element: ~90% of an
  interpreted mLSTM forward + backward. Combine functions are elementwise, so `sliced_generic_scan` applies the
  combine to whole slices, one position of the scan axis at a time: the same sequential order and float operations.
- Every call of a `@triton.jit` device function (a helper called from a kernel) re-patches triton.language for the
  interpreter (inspect.getmembers over tl, tl.core, tl.math: ~10% of the interpreted conv backward). The kernel
  launch around it has already patched those modules, and keeps them patched until it ends, so `patch_lang_once`
  skips the device function's patching when its language modules are among the launch's (`launch_tracked`).
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


_launches: list[list] = []  # per kernel launch running now: [ids of its language modules, patched yet]


def _language_modules(fn) -> set[int]:
    import triton.language as tl

    return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}


def launch_tracked(self, *args, **kwargs):
    """Replacement for triton.runtime.interpreter.GridExecutor.__call__ (a kernel launch): the interpreter's, with the
    launch's language modules on `_launches` while it runs."""
    from triton.runtime import interpreter

    _launches.append([_language_modules(self.fn), False])
    try:
        return interpreter.GridExecutor.interpreter_call(self, *args, **kwargs)
    finally:
        _launches.pop()


def patch_lang_once(fn):
    """Replacement for triton.runtime.interpreter._patch_lang: an empty scope for a device function called inside a
    launch that has patched its language modules (the launch restores them when it ends; the interpreter never
    restores a device function's scope); the interpreter's patching for the launch itself and anything else."""
    from triton.runtime import interpreter

    if _launches and _launches[-1][1] and _language_modules(fn) <= _launches[-1][0]:
        return interpreter._LangPatchScope()
    scope = interpreter.interpreter_patch_lang(fn)
    if _launches:
        _launches[-1][1] = True  # the launch's first patching is its own (GridExecutor.__call__ patches first)
    return scope


def install() -> bool:
    """Put both replacements in place; False (nothing changed) when this Triton lacks either original (then the tests
    run on the interpreter's own, slower code)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not (callable(getattr(interpreter.ScanOps, "generic_scan", None)) and callable(
            getattr(interpreter, "_patch_lang", None)) and hasattr(interpreter, "_LangPatchScope")
            and callable(getattr(interpreter, "GridExecutor", None))):
        return False
    if interpreter.ScanOps.generic_scan is not sliced_generic_scan:
        interpreter.ScanOps.interpreter_generic_scan = interpreter.ScanOps.generic_scan  # kept for the tests
        interpreter.ScanOps.generic_scan = sliced_generic_scan
    if interpreter._patch_lang is not patch_lang_once:
        interpreter.interpreter_patch_lang = interpreter._patch_lang
        interpreter._patch_lang = patch_lang_once
        interpreter.GridExecutor.interpreter_call = interpreter.GridExecutor.__call__
        interpreter.GridExecutor.__call__ = launch_tracked
    return True
