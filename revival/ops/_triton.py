"""What every Triton kernel of revival.ops asks first (is Triton importable, can its kernels run here), and the
host-side helpers the ops' Triton wrappers share: impl resolution, the chunkwise entry points' input checks and casts,
chunk size, launch-config merge."""

from __future__ import annotations

import dataclasses
import os

import torch

try:
    import triton

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def linear_recurrence_combine(a1, x1, a2, x2):
        """`tl.associative_scan`'s combine for S -> a S + x: S -> a1 S + x1 followed by S -> a2 S + x2."""
        return a1 * a2, a2 * x1 + x2


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


def resolve_impl(impl, tensor: torch.Tensor, fits_kernels: bool, impls: tuple[str, ...]) -> str:
    """`impl` checked against `impls` ("auto", "chunkwise", "triton"); "auto": "triton" on CUDA for 16/32-bit
    `tensor` when the shapes fit the kernels (`fits_kernels`) and Triton runs here, else "chunkwise"."""
    if not isinstance(impl, str) or impl not in impls:
        raise ValueError(f"impl: expected one of {impls}, got {impl!r}")
    if impl == "triton" and not available():
        raise ValueError(f"impl: 'triton' is not available here (device {tensor.device.type}); use 'auto' or "
                         "'chunkwise'")
    if impl == "auto":
        fits = tensor.device.type == "cuda" and tensor.dtype != torch.float64 and fits_kernels
        impl = "triton" if fits and available() else "chunkwise"
    return impl


def kernel_chunk_size(chunk_size: int, max_chunk: int = 64) -> int:
    """The chunk a chunkwise kernel uses for a requested `chunk_size`: a power of two in [16, max_chunk] (results
    agree to rounding: the chunking is exact)."""
    return max(16, min(max_chunk, 1 << max(chunk_size - 1, 0).bit_length()))


def merged_launch_config(requested, default):
    """The fields of the frozen dataclass `requested` (of `default`'s type, or None) that are set, `default`'s for
    the others."""
    if requested is not None and not isinstance(requested, type(default)):
        raise ValueError(f"launch: expected a {type(default).__name__} or None, got {type(requested).__name__}")
    if requested is None:
        return default
    chosen = {f.name: getattr(requested, f.name) for f in dataclasses.fields(requested)}
    return dataclasses.replace(default, **{name: value for name, value in chosen.items() if value is not None})


def chunkwise_kernel_inputs(matrices: dict[str, torch.Tensor], gates: tuple[torch.Tensor, ...], state,
                            state_shape: tuple[int, ...], document_starts, *, sizes_of: str, what: str,
                            **sizes: int):
    """The host-side prologue of a chunkwise Triton entry point. Checks that Triton is importable and that the
    inputs fit the kernels: the first of `matrices` float32/bfloat16/float16 and `sizes` (dims of the tensors
    `sizes_of` names) up to 256, tiles held whole on chip; a ValueError naming the arguments otherwise. Returns the
    inputs as the kernels read them, all contiguous: `matrices` in the first one's dtype, `gates` float32, the
    initial state float32 (zeros of `state_shape` for None) and the document starts int8 (or None)."""
    require_triton()
    x_name, x = next(iter(matrices.items()))
    if x.dtype == torch.float64:
        raise ValueError(f"{x_name}: impl='triton' supports float32/bfloat16/float16 inputs, got float64")
    if max(sizes.values()) > 256:
        got = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise ValueError(f"{sizes_of}: impl='triton' supports {what} up to 256, got {got}")
    matrices = tuple(m.to(x.dtype).contiguous() for m in matrices.values())
    gates = tuple(g.float().contiguous() for g in gates)
    S0 = torch.zeros(state_shape, device=x.device) if state is None else state.float().contiguous()
    starts = None if document_starts is None else document_starts.to(torch.int8).contiguous()
    return matrices, gates, S0, starts
