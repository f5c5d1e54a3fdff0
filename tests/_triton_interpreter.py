"""A faster `tl.associative_scan` for Triton's CPU interpreter, installed by tests/conftest.py.

The interpreter runs a scan with a user combine function (every scan in revival.ops: linear recurrences, the mLSTM
stabilizer, Newton's 2x2 blocks) one element at a time, a Python call per element: ~90% of an interpreted mLSTM
forward + backward. Combine functions are elementwise, so this applies the combine to whole slices, one position of
the scan axis at a time: the same sequential order and the same float operations, hence bit-identical results
(tests/test_interpreter_scan.py compares it with the interpreter's own loop). Kernel code is unchanged.
"""

from __future__ import annotations

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


def install() -> bool:
    """Put `sliced_generic_scan` in place of the interpreter's per-element scan; False (nothing changed) when this
    Triton has no such method (then the tests run on the interpreter's own, slower loop)."""
    try:
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        return False
    if not callable(getattr(ScanOps, "generic_scan", None)):
        return False
    if ScanOps.generic_scan is not sliced_generic_scan:
        ScanOps.interpreter_generic_scan = ScanOps.generic_scan  # kept for the equality test
        ScanOps.generic_scan = sliced_generic_scan
    return True
