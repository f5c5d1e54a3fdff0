"""GPU probe of the mLSTM decode step's variants (issue 26): which StepLaunch is fastest per shape.

Run on a CUDA machine (one process, about a minute on an H200):
    python benchmarks/gpu_mlstm_step_probe.py --out DIR
CPU check of the whole script (TRITON_INTERPRET=1, tiny shapes, correctness only, no timings):
    python benchmarks/gpu_mlstm_step_probe.py --smoke --out DIR
For each shape (B, H, Dk, Dv) it records: the byte floor (read + write the float32 state at the measured copy
bandwidth), a plain device copy of C, the official `mlstm_kernels` step if importable, and for every step variant x a
small grid of its launch parameters (revival.ops.mlstm.triton.step.StepLaunch; also the default launch writing into
preallocated `out=` buffers and updating C in place): eager do_bench median, CUDA-graph replay median (GPU time
alone), host microseconds per call and max|diff| against the float64 reference (h is bfloat16: its rounding shows).
Writes DIR/gpu_mlstm_step_variants.json (results/gpu_mlstm_step_probe.json is the earlier host-time probe). The
default launch is `step_launch` in revival/ops/mlstm/triton/step.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

SHAPES = [(16, 8, 256, 512), (1, 8, 256, 512), (16, 4, 96, 192)]
SMOKE_SHAPES = [(2, 2, 24, 40), (1, 2, 32, 64)]
# (variant, block_k, block_v, num_warps, num_stages): blocks are clipped to the shape, duplicates dropped
GRID = [
    ("tile", 0, 32, 4, 1), ("tile", 0, 64, 4, 1), ("tile", 0, 16, 2, 1),
    ("stream", 32, 128, 4, 2), ("stream", 32, 128, 4, 3), ("stream", 16, 256, 4, 3), ("stream", 32, 256, 8, 2),
    ("stream", 32, 64, 4, 2), ("stream", 8, 512, 4, 4),
]  # "split" (results/gpu_mlstm_step_variants.json, 0b52a26) never won and was deleted


def make_inputs(B, H, Dk, Dv, device, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    x = [r(B, H, Dk).bfloat16(), r(B, H, Dk).bfloat16(), r(B, H, Dv).bfloat16(), r(B, H), r(B, H) + 3]
    return x, (r(B, H, Dk, Dv), r(B, H, Dk), r(B, H))


def launches(B, H, Dk, Dv):
    """(name, StepLaunch, out mode) for every distinct launch of the grid at this shape; out mode: None (new
    tensors), "out" (preallocated buffers), "inplace" (C updated in place)."""
    from revival.ops.mlstm.triton.step import StepLaunch, _geometry, step_launch

    def key(cfg):  # what the launch runs: grid, constexprs and warps
        grid, consts = _geometry(B * H, Dk, Dv, cfg)
        return cfg.variant, cfg.num_warps, grid, tuple(consts.items())

    default = step_launch(B * H, Dk, Dv)
    rows = [("default", default, None), ("default+out", default, "out"), ("default+inplace", default, "inplace")]
    seen = {key(default)}
    for variant, bk, bv, warps, stages in GRID:
        cfg = StepLaunch(variant=variant, block_k=bk or 32, block_v=bv, num_warps=warps, num_stages=stages)
        if key(cfg) not in seen:
            seen.add(key(cfg))
            rows.append((f"{variant}_BK{bk}_BV{bv}_w{warps}_s{stages}" if variant != "tile" else
                         f"tile_BV{bv}_w{warps}", cfg, None))
    return rows


def call_for(step, x, state, cfg, mode):
    """A no-argument call of the step for timing (state buffers made once, outside the call)."""
    import torch

    if mode is None:
        return lambda: step(*x, state, launch=cfg)
    C = state[0].clone() if mode == "inplace" else torch.empty_like(state[0])
    out = (torch.empty_like(x[2]), C, torch.empty_like(state[1]), torch.empty_like(state[2]))
    st = (C, *state[1:]) if mode == "inplace" else state
    return lambda: step(*x, st, launch=cfg, out=out)


def max_diffs(step, x, state, cfg, mode):
    """max|diff| of h, C, n, m against the float64 reference (one call on fresh copies of the state)."""
    import torch

    from revival.ops.mlstm.reference import mlstm_step_reference

    h_ref, ref = mlstm_step_reference(*(t.double() for t in x), tuple(s.double() for s in state))
    st = tuple(s.clone() for s in state)
    if mode is None:
        h, new = step(*x, st, launch=cfg)
    else:
        out = (torch.empty_like(x[2]), st[0] if mode == "inplace" else torch.empty_like(st[0]),
               torch.empty_like(st[1]), torch.empty_like(st[2]))
        h, new = step(*x, st, launch=cfg, out=out)
    got = (h, *new)
    return {name: (g.double() - r).abs().max().item() for name, g, r in zip("hCnm", got, (h_ref, *ref))}


def host_us(fn, calls=300):
    """Host microseconds per call (no sync in the loop: the launches queue up)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def timings(fn, smoke):
    if smoke:
        return {"eager_ms": None, "graph_ms": None, "host_us": None}
    from _timing import do_bench_ms, graphed_ms

    return {"eager_ms": do_bench_ms(fn), "graph_ms": graphed_ms(fn), "host_us": host_us(fn)}


def official_step():
    try:
        from mlstm_kernels.torch import get_mlstm_step_kernel

        return get_mlstm_step_kernel("triton"), None
    except Exception as e:  # noqa: BLE001
        return None, f"not importable: {type(e).__name__}: {e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU: TRITON_INTERPRET=1, tiny shapes, no timings")
    ap.add_argument("--budget-s", type=float, default=85.0, help="stop timing new launches after this many seconds")
    args = ap.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it reads the variable once
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _timing's do_bench_ms / graphed_ms
    import torch
    import triton

    from revival.ops.mlstm.triton.step import mlstm_step_triton

    device = "cpu" if args.smoke else "cuda"
    start = time.perf_counter()
    result = {"what": "issue 26: mLSTM step variants (StepLaunch) x launch params, eager do_bench / CUDA-graph "
                      "medians, host us per call, max|diff| vs float64; copy of C, official step, byte floor",
              "smoke": args.smoke, "torch": torch.__version__, "triton": triton.__version__,
              "device": "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()}
    official, official_error = (None, "skipped: --smoke") if args.smoke else official_step()
    try:
        result["mlstm_kernels"] = __import__("mlstm_kernels").__version__
    except Exception as e:  # noqa: BLE001
        result["mlstm_kernels"] = f"not importable: {type(e).__name__}: {e}"
    if not args.smoke:
        from _timing import do_bench_ms

        big = torch.randn(1 << 28, device=device)
        dst = torch.empty_like(big)
        result["copy_TBps"] = 2 * big.numel() * 4 / do_bench_ms(lambda: dst.copy_(big)) / 1e9
        del big, dst
    shapes = {}
    for (B, H, Dk, Dv) in SMOKE_SHAPES if args.smoke else SHAPES:
        x, state = make_inputs(B, H, Dk, Dv, device, seed=B + H + Dk + Dv)
        row = {}
        if not args.smoke:
            row["floor_ms"] = 2 * B * H * (Dk * Dv + Dk + 1) * 4 / (result["copy_TBps"] * 1e9)
            C_copy = torch.empty_like(state[0])
            row["copy_C"] = timings(lambda C_copy=C_copy, C=state[0]: C_copy.copy_(C), False)
        if official is not None:
            oa = [*x[:3], x[3][..., None], x[4][..., None], state[0], state[1], state[2][..., None]]
            row["official"] = timings(lambda oa=oa: official(*oa), False)
        else:
            row["official"] = official_error
        variants = {}
        for name, cfg, mode in launches(B, H, Dk, Dv):
            entry = {"launch": dataclasses.asdict(cfg), "out": mode}
            if time.perf_counter() - start > args.budget_s:
                entry["skipped"] = f"budget of {args.budget_s} s spent"
            else:
                try:
                    entry["max_abs_diff"] = max_diffs(mlstm_step_triton, x, state, cfg, mode)
                    entry.update(timings(call_for(mlstm_step_triton, x, state, cfg, mode), args.smoke))
                    if entry["graph_ms"] is not None:
                        entry["graph_over_floor"] = entry["graph_ms"] / row["floor_ms"]
                except Exception as e:  # noqa: BLE001
                    entry["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            variants[name] = entry
            print(f"{B},{H},{Dk},{Dv} {name:28s} "
                  + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                             if k in ("eager_ms", "graph_ms", "host_us", "error", "skipped"))
                  + f" maxdiff={entry.get('max_abs_diff')}", flush=True)
        row["variants"] = variants
        timed = {n: e["graph_ms"] for n, e in variants.items() if e.get("graph_ms") is not None}
        if timed:
            row["fastest_graph"] = min(timed, key=timed.get)
        shapes[f"{B},{H},{Dk},{Dv}"] = row
        if not args.smoke:
            print(f"{B},{H},{Dk},{Dv}: floor {row['floor_ms']:.4f} ms, copy of C {row['copy_C']['graph_ms']:.4f}, "
                  f"official {row['official'] if isinstance(row['official'], str) else row['official']['graph_ms']}"
                  f", fastest {row.get('fastest_graph')} {timed.get(row.get('fastest_graph'), float('nan')):.4f}",
                  flush=True)
    result["shapes"] = shapes
    result["wall_s"] = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_mlstm_step_variants.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1)
    print("wrote", path, f"({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
