"""What every Triton kernel of revival.ops asks first: is Triton importable, and can its kernels run here."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

# Triton reads TRITON_INTERPRET once, when it is imported: kernels then run on the CPU (tests at tiny shapes)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Triton importable, and a CUDA device or TRITON_INTERPRET=1 (CPU tests)."""
    return HAVE_TRITON and (torch.cuda.is_available() or INTERPRET)


def require_triton() -> None:
    """Raise the one-line install hint when an impl='triton' call finds no `triton` package."""
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the `triton` package (pip install 'revival[gpu]')")


class CompiledLaunch:
    """Launch a `@triton.jit` kernel through its compiled handle once it has been compiled for these arguments.

    The JIT's own call binds and specialises every argument on each launch (~15 us of host time on the H200 machine),
    more than a one-token decode kernel runs on the GPU. This keeps one compiled kernel per specialisation key (what
    the JIT specialises on: tensor dtypes and 16-byte alignment, integers equal to 1 or divisible by 16, the
    constexprs and the launch options) and calls its launcher directly. The constexprs must be the kernel's last
    parameters, given in their order. The first call of a key and the interpreter go through the JIT as usual.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._compiled: dict[tuple, object] = {}

    @staticmethod
    def _key(args, constexprs: dict, options: dict) -> tuple:
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                key.append((a.dtype, a.device.index, a.data_ptr() % 16 == 0))
            elif isinstance(a, bool) or not isinstance(a, int):
                key.append(type(a))
            else:
                key.append((a == 1, a % 16 == 0, -2**31 <= a < 2**31))
        return tuple(key), tuple(constexprs.items()), tuple(options.items())

    def __call__(self, grid: tuple, *args, constexprs: dict, **options) -> None:
        if INTERPRET:
            self.kernel[grid](*args, **constexprs, **options)
            return
        key = self._key(args, constexprs, options)
        compiled = self._compiled.get(key)
        if compiled is None:
            trailing = self.kernel.arg_names[len(args):]
            if trailing != list(constexprs):
                raise ValueError(f"constexprs: expected the kernel's last parameters {trailing} in order, "
                                 f"got {list(constexprs)}")
            compiled = self.kernel[grid](*args, **constexprs, **options)
            compiled._init_handles()
            self._compiled[key] = compiled
            return
        from triton import knobs

        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = torch.cuda.current_stream(args[0].device).cuda_stream
        args = (*args, *constexprs.values())
        compiled.run(*grid, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *args), knobs.runtime.launch_enter_hook,
                     knobs.runtime.launch_exit_hook, *args)
