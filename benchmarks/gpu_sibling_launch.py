"""Launch-setting probe of the Gated DeltaNet and SSD Triton kernels at the 125M training shapes (issue 20).

Run on a CUDA machine:  python benchmarks/gpu_sibling_launch.py --out $OUT [--kinds gdn,ssd]

`benchmarks/gpu_profile_train.py` found the gradient kernels (`_grads_kernel`) at about a quarter of the step of
gated-deltanet and mamba2 at 125M / 2k context. This probe times the op's forward and forward+backward (CUDA-event
medians, bf16 inputs) at the shapes those models run, (B, T) = (16, 2048): the delta rule at H = 6, Dk = 128,
Dv = 256 and SSD at H = 24, P = 64, N = 128, under the default `LaunchConfig` and under variants that change one
field (warps, the Dv / P tile, pipelining, reloads) or the chunk size, and fla's chunk_gated_delta_rule as the
anchor where it runs (a refusal is recorded). Writes gpu_sibling_launch.json after every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpu_siblings import fla_gdn, gdn_inputs, ssd_inputs, time_one  # noqa: E402

from revival.bench.report import environment, write_json  # noqa: E402

GDN_SHAPE = dict(B=16, T=2048, H=6, D=128, expand_v=2)  # gated-deltanet / hybrid at 125M
SSD_SHAPE = dict(B=16, T=2048, H=24, P=64, N=128)  # mamba2 at 125M
BATCH_AT = {"2k": (16, 2048), "32k": (1, 32768)}  # --context: (B, T) of `revival bench train` at 125M
# name: (LaunchConfig fields, chunk size); "default" first
GDN_VARIANTS = {
    "default": ({}, 64), "chunk32": ({}, 32), "warps_grads4": ({"warps_grads": 4}, 64),
    "block_v_grads32": ({"block_v_grads": 32}, 64), "block_v_grads64": ({"block_v_grads": 64}, 64),
    "block_v_grads128": ({"block_v_grads": 128}, 64), "chunk32_block_v_grads64": ({"block_v_grads": 64}, 32),
    "stages_grads2": ({"stages_grads": 2}, 64),  # after the -dV~ accumulate: no spills in either kernel (below)
    "stages_grads1": ({"stages_grads": 1}, 64),  # the default before session 18 (2 at 16-bit Dk <= 128 since)
    "warps_dstates8": ({"warps_dstates": 8}, 64), "block_v_dstates32": ({"block_v_dstates": 32}, 64),
    "warps_wy8": ({"warps_wy": 8}, 64), "warps_output8": ({"warps_output": 8}, 64),
    # sm_90 probe, bf16 (128, 256), 96 rows (registers / spill bytes / shared KB / programs per SM; default
    # dstates 255 / 728 / 48 / 2 unpipelined, grads_output 249 / 0 / 80 / 1, grads_wy 250 / 0 / 52 / 1):
    # pipelined state-gradient walk, 8 warps: 255 / 44 / 184 / 1 (384 programs)
    "dstates_w8_s2": ({"warps_dstates": 8, "stages_dstates": 2}, 64),
    # the same at Dv-tile 32: 220 / 0 / 140 / 1 (768 programs, ~5.8 waves of 132 SMs)
    "dstates_v32_w8_s2": ({"block_v_dstates": 32, "warps_dstates": 8, "stages_dstates": 2}, 64),
    # both gradient kernels pipelined without spills (grads_output 254 / 0 / 112, grads_wy 255 / 0 / 116), with that
    # walk
    "dstates_v32_w8_s2_grads_s2": ({"block_v_dstates": 32, "warps_dstates": 8, "stages_dstates": 2,
                                    "stages_grads": 2}, 64),
    "dstates_w8_s2_grads_s2": ({"warps_dstates": 8, "stages_dstates": 2, "stages_grads": 2}, 64),
    # --context 32k (batch 1: 6 rows): the walks have Dv / 32 x 6 = 48 programs on 132 SMs; 16-wide tiles double the
    # programs at the cost of re-reading k, q, w once more per tile
    "dstates_v16": ({"block_v_dstates": 16}, 64), "states_v16": ({"block_v_states": 16}, 64),
    "walks_v16": ({"block_v_dstates": 16, "block_v_states": 16}, 64),
    "walks_v16_dstates_w4": ({"block_v_dstates": 16, "block_v_states": 16, "warps_dstates": 4}, 64),
    "walks_v16_dstates_w4_s2": ({"block_v_dstates": 16, "block_v_states": 16, "warps_dstates": 4,
                                 "stages_dstates": 2}, 64),
    # the walks in segments (forward.py segmented_walk; session 19): at 32k the default takes 21 segments of 25 chunks
    "segments1": ({"segments": 1}, 64), "segments2": ({"segments": 2}, 64), "segments4": ({"segments": 4}, 64),
    "segments8": ({"segments": 8}, 64),
    "segments16": ({"segments": 16}, 64), "segments32": ({"segments": 32}, 64),
    "segments16_v32": ({"segments": 16, "block_v_states": 32, "block_v_dstates": 32}, 64),
    # the WY inverse's diagonal blocks (session 20; default 16): 64 is the plain substitution of one (64, 64) block
    "inverse_block32": ({"inverse_block": 32}, 64), "inverse_block64": ({"inverse_block": 64}, 64),
}
SSD_VARIANTS = {
    "default": ({}, 64), "chunk32": ({}, 32), "chunk128": ({}, 128), "warps_grads4": ({"warps_grads": 4}, 64),
    "block_p_grads32": ({"block_p_grads": 32}, 64), "warps_dstates8": ({"warps_dstates": 8}, 64),
    "block_p_dstates16": ({"block_p_dstates": 16}, 64),
    # dB / dC kernels' (N-tile, P-tile, warps): the default is (32, 32, 2), (32, 16, 8) before session 15
    "grads_n128_p64": ({"block_n_grads": 128, "block_p_grads": 64}, 64),
    "grads_n64_p32": ({"block_n_grads": 64, "block_p_grads": 32}, 64),
    "grads_n32_p32_w4": ({"block_n_grads": 32, "block_p_grads": 32, "warps_grads": 4}, 64),
    "grads_n16_p16": ({"block_n_grads": 16, "block_p_grads": 16}, 64),
    # around the best of the first sweep (32, 32, 4 warps: fwd+bwd 6.50 ms against the default's 8.32)
    "grads_n32_p64_w4": ({"block_n_grads": 32, "block_p_grads": 64, "warps_grads": 4}, 64),
    "grads_n64_p32_w4": ({"block_n_grads": 64, "block_p_grads": 32, "warps_grads": 4}, 64),
    "grads_n64_p64_w4": ({"block_n_grads": 64, "block_p_grads": 64, "warps_grads": 4}, 64),
    "grads_n32_p32_w2": ({"block_n_grads": 32, "block_p_grads": 32, "warps_grads": 2}, 64),
    "grads_n16_p32_w4": ({"block_n_grads": 16, "block_p_grads": 32, "warps_grads": 4}, 64),
    # segmented walks (`config.default_segments`: 1 at 2k's 384 batch*heads, 5 at 32k's 24): at --context 32k
    # `--kinds ssd --variants default,segments1,segments4,segments8,segments16`
    "segments1": ({"segments": 1}, 64), "segments2": ({"segments": 2}, 64), "segments4": ({"segments": 4}, 64),
    "segments8": ({"segments": 8}, 64),
    "segments16": ({"segments": 16}, 64),
}


def gdn_call(fields: dict, chunk_size: int):
    from revival.ops.delta_rule.triton import LaunchConfig, gated_delta_rule_triton

    launch = LaunchConfig(**fields)
    return lambda: (lambda q, k, v, g, beta, state: gated_delta_rule_triton(
        q, k, v, g, beta, state, q.shape[-1] ** -0.5, chunk_size=chunk_size, launch=launch))


def ssd_call(fields: dict, chunk_size: int):
    from revival.ops.ssd.triton import LaunchConfig, ssd_triton

    launch = LaunchConfig(**fields)
    return lambda: (lambda x, dt, A, B, C, D, state: ssd_triton(x, dt, A, B, C, D, state, chunk_size=chunk_size,
                                                                launch=launch))


def row(make, inputs, out_index, device) -> dict:
    try:
        forward_ms, forward_backward_ms = time_one(make, inputs, out_index, device)
    except Exception as error:  # OutOfResources, a refusal: recorded as such
        return {"error": f"{type(error).__name__}: {str(error)[:300]}"}
    return {"forward_ms": forward_ms, "forward_backward_ms": forward_backward_ms,
            "backward_ms": forward_backward_ms - forward_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="gdn,ssd")
    parser.add_argument("--variants", default=None, help="comma-separated variant names to run (default: all)")
    parser.add_argument("--context", choices=sorted(BATCH_AT), default="2k",
                        help="the training shape: 2k = (B, T) (16, 2048), 32k = (1, 32768) (default 2k)")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    args = parser.parse_args()
    device = "cuda"
    batch, length = BATCH_AT[args.context]
    gdn_shape, ssd_shape = ({**shape, "B": batch, "T": length} for shape in (GDN_SHAPE, SSD_SHAPE))
    result = {"what": "issue 20: launch settings of the GDN / SSD Triton kernels at 125M training shapes (ms)",
              "environment": environment(torch.device(device)), "gdn_shape": gdn_shape, "ssd_shape": ssd_shape,
              "rows": {}}
    path = os.path.join(args.out, f"gpu_sibling_launch{'' if args.context == '2k' else '_' + args.context}.json")
    os.makedirs(args.out, exist_ok=True)
    begin = time.time()
    for kind in args.kinds.split(","):
        if kind == "gdn":
            s = gdn_shape
            inputs, out_index = gdn_inputs(s["B"], s["T"], s["H"], s["D"], torch.bfloat16, device, beta_max=1.0,
                                           expand_v=s["expand_v"]), 2
            makes = {name: gdn_call(*variant) for name, variant in GDN_VARIANTS.items()}
            makes["fla_chunk_gated_delta_rule"] = fla_gdn
        else:
            s = ssd_shape
            inputs, out_index = ssd_inputs(s["B"], s["T"], s["H"], s["P"], torch.bfloat16, device, N=s["N"]), 0
            makes = {name: ssd_call(*variant) for name, variant in SSD_VARIANTS.items()}
        chosen = None if args.variants is None else set(args.variants.split(","))
        for name, make in makes.items():
            if chosen is not None and name not in chosen:
                continue
            entry = row(make, inputs, out_index, device)
            result["rows"][f"{kind}/{name}"] = entry
            shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items())
            print(f"{kind}/{name}: {shown}  ({time.time() - begin:.0f} s)", flush=True)
            write_json(result, path)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
