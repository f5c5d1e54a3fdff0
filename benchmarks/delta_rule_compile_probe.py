"""Compile the Triton gated delta rule kernels for a GPU target on this machine (no GPU needed) and record, per
kernel, the compile seconds, shared memory, registers and spill stores that ptxas reports, and programs per SM.

    python benchmarks/delta_rule_compile_probe.py [--cases ieee:64x128,tf32:64x128] [--kernels grads_output,grads_wy]
        [--launch block_v_grads=64,warps_grads=4] [--arch 90] [--out DIR] [--smoke]

A case is PRODUCTS:DKxDV: PRODUCTS the products' input_precision ("ieee": the float32 path before tf32x3, "tf32x3":
float32 inputs now, "tf32": 16-bit inputs; the WY inverse takes "tf32x3" unless PRODUCTS is "ieee"), the head dims
Dk, Dv. Launch settings are the wrapper's defaults (`launch_config` for --rows batch*head rows, default 64, and
the case's dtype: float32 for "ieee" / "tf32x3", bfloat16 for "tf32"; chunk 64), with --launch's LaunchConfig fields
over them. A kernel whose shared memory
exceeds the target's (sm_90: 227 KB) raises OutOfResources on the GPU; `forward.launch` then compiles it again with
num_stages=1, which this probe does too (both compiles counted). Each case compiles in a
fresh Triton cache (several minutes for "ieee"). Writes delta_rule_compile.json under --out (default: $OUT, else runs/).
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


def kernel_cases(products: str, Dk: int, Dv: int, rows: int, grads_stages: int | None, launch: dict):
    """(name, kernel, data dtype, its pointers, constexprs, num_warps, num_stages) as the wrapper launches them;
    `grads_stages` 0 is the config's num_stages for the gradient kernels, None Triton's default; `launch`:
    LaunchConfig fields set over the defaults."""
    import torch

    from revival.ops.delta_rule.triton import backward, forward
    from revival.ops.delta_rule.triton.config import LaunchConfig, launch_config, wide_block_v

    data = "bf16" if products == "tf32" else "fp32"
    cfg = launch_config(Dk, Dv, rows, torch.bfloat16 if data == "bf16" else torch.float32, LaunchConfig(**launch))
    BK, BV = forward.pow2(Dk), forward.pow2(Dv)
    common = dict(L=64, BK=BK, PRECISION=products, HAS_STARTS=False)
    grads_stages = cfg.stages_grads if grads_stages == 0 else grads_stages
    grads = dict(common, BV=wide_block_v(cfg.block_v_grads, BV))  # the tile the wrapper launches
    inputs = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "o_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    full_walk = dict(WALK="full", FIRST_SEGMENT=0)  # the walk as one segment runs it
    return [
        ("wy", forward._wy_kernel, data, inputs, dict(common, BV=min(cfg.block_v_wy, BV), SAVE_INVERSE=True,
                                                    INVERSE_BLOCK=min(cfg.inverse_block, common["L"])),
         cfg.warps_wy, None),
        ("states", forward._states_kernel, data, inputs, dict(common, BV=min(cfg.block_v_states, BV), **full_walk),
         cfg.warps_states, None),
        ("output", forward._output_kernel, data, inputs, dict(common, BV=min(cfg.block_v_output, BV)),
         cfg.warps_output, None),
        ("local_du", backward._local_du_kernel, data, inputs, dict(common, BV=min(cfg.block_v_du, BV)), cfg.warps_du,
         None),
        ("dstates", backward._dstates_kernel, data, inputs,
         dict(common, BV=wide_block_v(cfg.block_v_dstates, BV), **full_walk), cfg.warps_dstates, cfg.stages_dstates),
        ("grads_output", backward._output_grads_kernel, data, inputs, grads, cfg.warps_grads, grads_stages),
        ("grads_wy", backward._wy_grads_kernel, data, inputs, grads, cfg.warps_grads, grads_stages),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="ieee:64x128,tf32x3:64x128,tf32:64x128,tf32:16x32")
    parser.add_argument("--kernels", default="wy,states,output,local_du,dstates,grads_output,grads_wy")
    parser.add_argument("--launch", default="", help="LaunchConfig fields over the defaults: warps_grads=4,...")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default: 90, Hopper)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    parser.add_argument("--rows", type=int, default=64,
                        help="batch*heads the launch defaults are chosen for (default 64; below 64: narrower tiles)")
    parser.add_argument("--grads-stages", type=int, default=0,
                        help="num_stages of the gradient kernel (default 0: the launch config's; 3: before b72e8c2)")
    parser.add_argument("--smoke", action="store_true", help="one small case, the states kernel: checks the script")
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    cases = ["tf32:16x32"] if args.smoke else args.cases.split(",")
    launch = parse_launch(args.launch)
    wanted = ["states"] if args.smoke else args.kernels.split(",")
    limit = SHARED_LIMIT.get(args.arch)
    results = []
    for case in cases:
        products, dims = case.split(":")
        Dk, Dv = (int(x) for x in dims.split("x"))
        # every case from scratch (Dv is no specialisation key: 128x256 would find 128x128's kernels cached)
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="delta_rule_compile_")
        sizes = dict(T=256, H=4, NC=4, SPAN=4, DK=Dk, DV=Dv, WIDTH=Dv)
        cases_here = kernel_cases(products, Dk, Dv, args.rows, args.grads_stages, launch)
        for name, kernel, data, inputs, constexprs, warps, stages in cases_here:
            if name not in wanted:
                continue
            row = {"products": products, "Dk": Dk, "Dv": Dv, "rows": args.rows, "kernel": name, "data": data,
                   **({"launch": launch} if launch else {}), "warps": warps,
                   "BV": constexprs.get("BV"),
                   **compile_kernel(kernel, data, inputs, constexprs, warps, stages, args.arch, sizes)}
            if limit is not None and row["shared_bytes"] > limit and stages != 1:  # what forward.launch does next
                row["unpipelined"] = compile_kernel(kernel, data, inputs, constexprs, warps, 1, args.arch, sizes)
            launched = row.get("unpipelined", row)  # the compile that runs
            row["occupancy"] = programs_per_sm(launched["registers"], launched["shared_bytes"], warps, args.arch)
            results.append(row)
            print(json.dumps(row), flush=True)
    totals = {}
    for row in results:
        key = f"{row['products']}:{row['Dk']}x{row['Dv']}"
        totals[key] = round(totals.get(key, 0.0) + row["seconds"] + row.get("unpipelined", {}).get("seconds", 0.0), 1)
    path = write_results(args.out, "delta_rule_compile.json", args.arch, results, totals)
    print("compile seconds per case (all kernels):", json.dumps(totals))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
