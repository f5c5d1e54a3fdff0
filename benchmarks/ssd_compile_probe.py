"""Compile the Triton SSD (Mamba-2) kernels for a GPU target on this machine (no GPU needed) and record, per kernel,
the compile seconds, shared memory, registers and spill stores that ptxas reports.

    python benchmarks/ssd_compile_probe.py [--cases tf32:64x128,ieee:64x128] [--kernels dc,db,walk]
        [--launch block_n_grads=64,warps_grads=4 ...] [--rows 384] [--arch 90] [--name ssd_compile.json] [--out DIR]

A case is PRODUCTS:PxN: PRODUCTS the products' input_precision ("tf32": 16-bit inputs, bfloat16 data; "ieee":
float32 inputs), P the head dim, N the state size (the 125M preset: P 64, N 128, 24 heads, chunk 64). Launch
settings are the wrapper's defaults (`launch_config` for --rows batch*head rows, default 384 = 16 x 24), with
--launch's LaunchConfig fields over them; the kernels are those of `backward.training_kernels`, under its names.
Like `forward.launch`, a kernel over the target's shared memory is compiled once more with num_stages=1. Each case
compiles in a fresh Triton cache. --launch may be given several times: every case under each (a kernel a variant
leaves unchanged is listed once, under the first). Each row's "occupancy": programs per SM of the variant `launch`
runs and the resource that binds (`programs_per_sm`). Writes --name (default ssd_compile.json) under --out
(default: $OUT, else runs/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _compile_probe import SHARED_LIMIT, compile_kernel, parse_launch, programs_per_sm, write_results  # noqa: E402

# the pointers that carry the data dtype (x's, also dB's and dC's); every other pointer is float32 (dt, A, states)
INPUTS = ("x_ptr", "b_ptr", "c_ptr", "dy_ptr", "dx_ptr", "y_ptr", "u_ptr", "v_ptr", "db_ptr", "dc_ptr")


def kernel_cases(P: int, N: int, rows: int, launch: dict):
    """(name, kernel, constexprs besides L / BN / PRECISION / HAS_STARTS, num_warps) as the wrapper launches them."""
    from revival.ops.ssd.triton import backward, forward
    from revival.ops.ssd.triton.config import LaunchConfig, launch_config

    cfg = launch_config(P, N, rows, LaunchConfig(**launch))
    BP = forward.pow2(P)
    return [(name, kernel, dict(constexprs, BP=min(block_p, BP)), warps)
            for name, kernel, constexprs, block_p, warps in backward.training_kernels(cfg)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="tf32:64x128,ieee:64x128")
    parser.add_argument("--kernels", default="", help="names in backward.training_kernels (default: all)")
    parser.add_argument("--launch", action="append", default=None,
                        help="LaunchConfig fields over the defaults: warps_grads=4,... (repeatable)")
    parser.add_argument("--rows", type=int, default=384, help="batch*heads the launch defaults are chosen for")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default: 90, Hopper)")
    parser.add_argument("--name", default="ssd_compile.json")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    launches = [parse_launch(text) for text in (args.launch or [""])]
    wanted = set(args.kernels.split(",")) if args.kernels else None
    limit = SHARED_LIMIT.get(args.arch)
    results, totals = [], {}
    for case in args.cases.split(","):
        products, dims = case.split(":")
        P, N = (int(x) for x in dims.split("x"))
        data = "bf16" if products == "tf32" else "fp32"
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssd_compile_")
        sizes = dict(T=2048, H=24, G=1, NC=32, P=P, N=N)
        seen = set()
        for launch in launches:
            for name, kernel, constexprs, warps in kernel_cases(P, N, args.rows, launch):
                if wanted is not None and name not in wanted:
                    continue
                BN = max(16, 1 << (N - 1).bit_length())  # whole N, or the kernel's N-tile (min, as the wrapper)
                constexprs = dict(constexprs, L=64, BN=min(constexprs.get("BN", BN), BN), PRECISION=products,
                                  HAS_STARTS=False)
                constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
                key = (name, warps, tuple(sorted(constexprs.items())))
                if key in seen:  # unchanged by this launch variant: its row is the earlier one
                    continue
                seen.add(key)
                row = {"products": products, "P": P, "N": N, "rows": args.rows, "kernel": name, "data": data,
                       **({"launch": launch} if launch else {}), "warps": warps, "BP": constexprs.get("BP"),
                       "BN": constexprs["BN"],
                       **compile_kernel(kernel, data, INPUTS, constexprs, warps, None, args.arch, sizes)}
                if limit is not None and row["shared_bytes"] > limit:  # what forward.launch does next
                    row["unpipelined"] = compile_kernel(kernel, data, INPUTS, constexprs, warps, 1, args.arch,
                                                        sizes)
                ran = row.get("unpipelined", row)
                row["occupancy"] = programs_per_sm(ran["registers"], ran["shared_bytes"], warps, args.arch)
                results.append(row)
                totals[case] = round(totals.get(case, 0.0) + row["seconds"]
                                     + row.get("unpipelined", {}).get("seconds", 0.0), 1)
                print(json.dumps(row), flush=True)
    path = write_results(args.out, args.name, args.arch, results, totals)
    print("compile seconds per case:", json.dumps(totals))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
