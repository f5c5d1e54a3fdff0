"""Helpers of the *_compile_probe.py scripts (import as `from _compile_probe import ...`: the scripts run from this
folder): compile one Triton kernel for a GPU target on this machine (no GPU needed) and read what ptxas reports."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import re
import time

SHARED_LIMIT = {90: 232448, 100: 232448, 80: 166912}  # bytes of shared memory one block may use
# per SM: (32-bit registers, resident warps, resident blocks, shared bytes; 1 KB more is reserved per block)
SM_LIMITS = {90: (65536, 64, 32, 233472), 100: (65536, 64, 32, 233472), 80: (65536, 64, 32, 167936)}


def compile_kernel(kernel, data: str, inputs: tuple, constexprs: dict, num_warps: int, num_stages: int | None,
                   arch: int, sizes: dict) -> dict:
    """One compile: the signature as the JIT builds it for contiguous 16-byte-aligned tensors and the int `sizes`;
    pointers named in `inputs` point to `data` ("bf16", "fp32"), the others to float32."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (data if name in inputs else "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if sizes[name] % 16 == 0 and not any(p.name == name and p.do_not_specialize for p in kernel.params):
                attrs[(index,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps} | ({} if num_stages is None else {"num_stages": num_stages})
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options)
    seconds = time.perf_counter() - start
    text = log.getvalue()
    registers = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    return {"seconds": round(seconds, 2), "shared_bytes": compiled.metadata.shared, "num_stages": num_stages,
            "registers": max(registers, default=None), "spill_store_bytes": max(spills, default=None)}


def programs_per_sm(registers: int | None, shared_bytes: int, num_warps: int, arch: int) -> dict | None:
    """How many programs of one kernel an SM holds at once, and which resource binds: registers are allocated per
    warp in units of 256 (a thread's count rounded up to 8), shared memory per block with 1 KB reserved for the
    system (CUDA occupancy calculator rules). None for an unknown arch or a missing register count."""
    if arch not in SM_LIMITS or registers is None:
        return None
    regs, warps, blocks, shared = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // 256) * 256
    limits = {"registers": regs // per_warp // num_warps, "warps": warps // num_warps, "blocks": blocks,
              "shared": shared // (shared_bytes + 1024)}
    count = min(limits.values())
    return {"programs_per_sm": count, "warps_per_sm": count * num_warps,
            "bound_by": [name for name, value in limits.items() if value == count]}


def parse_launch(text: str) -> dict:
    """--launch "block_p_grads=32,warps_grads=4" as LaunchConfig fields (ints, or True / False)."""
    return {key: (value == "True" if value in ("True", "False") else int(value))
            for key, _, value in (field.partition("=") for field in text.split(",") if field)}


def write_results(out: str, name: str, arch: int, results: list, totals: dict) -> str:
    """The probe's JSON (rows, compile seconds per case, host and Triton version) as `name` under `out`."""
    import triton

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    with open(path, "w") as f:
        json.dump({"arch": arch, "triton": triton.__version__, "host": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "shared_limit_bytes": SHARED_LIMIT.get(arch), "results": results,
                   "compile_seconds_per_case": totals}, f, indent=1)
    return path
