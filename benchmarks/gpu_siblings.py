"""GPU benchmark of revival's Triton Gated DeltaNet, Mamba-2 SSD and Mamba-3 kernels, one process (< 7 minutes on an
H200).

Run on a CUDA machine:  python benchmarks/gpu_siblings.py [--out DIR] [--sections checks,timings,mamba3,steps]
(--out default: $OUT, else runs/; --sections default: all four, in that order)
It (1) checks the Triton kernels (outputs, final state and every gradient, bfloat16 and float32) against the float64
chunkwise path (itself tested equal to the float64 loop) at real shapes, (2) times forward and forward+backward
(CUDA-event medians) of revival's Triton kernels, their chunkwise PyTorch paths and, where importable, fla's
chunk_gated_delta_rule and mamba-ssm's mamba_chunk_scan_combined (an ImportError or a refusal is recorded as such) at
(B, T, H, D) = (8, 8192, 16, 128) and (1, 65536, 16, 128) (SSD: P = 128, N = 128, one group), and Mamba-3 SISO (Triton
on SSD's kernels, and chunkwise) beside SSD's kernels at the 125M layers' heads (24 heads, P = 64; Mamba-3 N = 64,
Mamba-2 N = 128) ("mamba3"), (3) times the decode steps ("steps"), and writes gpu_siblings.json after every check
row and timing group ("complete": false until the end: a run cut short keeps what it measured). `--smoke` runs the
same flow at tiny shapes (also on the CPU under TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from _timing import event_ms, wall_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = [(8, 8192, 16, 128), (1, 65536, 16, 128)]  # B, T, H, D
# B, T, H, D (GDN: Dk = D, Dv = expand_v * D; SSD: P = D, N = 128), expand_v, dtype, packed documents (starts every
# ~700 tokens), kinds. Dv = 256 is the 125M Gated DeltaNet preset's head (d_model 768, 6 heads, expand_v 2).
CHECKS = [
    (2, 4100, 8, 128, 1, torch.bfloat16, False, ("gdn", "ssd", "mamba3")),
    (2, 4100, 8, 128, 1, torch.float32, False, ("gdn", "ssd", "mamba3")),
    (1, 2049, 4, 64, 1, torch.bfloat16, False, ("gdn", "ssd", "mamba3")),
    (2, 4100, 8, 128, 1, torch.bfloat16, True, ("gdn", "ssd", "mamba3")),
    (2, 2049, 6, 128, 2, torch.bfloat16, False, ("gdn",)),
    (2, 2049, 6, 128, 2, torch.float32, False, ("gdn",)),  # float32 at Dv = 256: the kernels' widest tiles
    (1, 2049, 4, 64, 1, torch.float32, False, ("gdn",)),
]
SECTIONS = ("checks", "timings", "mamba3", "steps")
STEP_SHAPES = [(8, 16, 128), (1, 16, 128)]  # B, H, D
# B, T, H, P, N of Mamba-3 at the 125M preset (d_model 768, expand 2, 24 heads of 64, d_state 64); SSD beside it at
# the same heads with N = 64 (the kernels' cost per head, Mamba-3 runs them on 2H heads) and N = 128 (the Mamba-2 layer)
MAMBA3_SHAPES = [(8, 8192, 24, 64, 64), (1, 65536, 24, 64, 64)]
MAMBA3_NAMES = "y state dx ddt dA dlam dB dC dtheta dD dangle0 dssm0 dprev_B0 dprev_x0"


def gdn_inputs(B, T, H, D, dtype, device, seed=0, beta_max=2.0, expand_v=1):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    q = F.normalize(r(B, T, H, D), dim=-1).to(dtype)
    k = F.normalize(r(B, T, H, D), dim=-1).to(dtype)
    v = r(B, T, H, D * expand_v).to(dtype)
    gate = -torch.rand(B, T, H, device=device, generator=g) * 0.5
    beta = torch.rand(B, T, H, device=device, generator=g) * beta_max
    state = r(B, H, D, D * expand_v) * 0.1
    return [q, k, v, gate, beta, state]


def ssd_inputs(B, T, H, P, dtype, device, seed=0, N=128, G=1):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    x = r(B, T, H, P).to(dtype)
    dt = F.softplus(r(B, T, H) - 3.0)
    A = -torch.rand(H, device=device, generator=g) * 4 - 0.5
    Bm, Cm = (r(B, T, G, N) * N**-0.5).to(dtype), (r(B, T, G, N) * N**-0.5).to(dtype)
    D = r(H)
    state = r(B, H, P, N) * 0.1
    return [x, dt, A, Bm, Cm, D, state]


def mamba3_inputs(B, T, H, P, dtype, device, seed=0, N=128):
    """x, dt, A, lam, B, C, theta, D, then the initial state's four parts (angle, ssm, previous B, previous x); SISO."""
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    x = r(B, T, H, 1, P).to(dtype)
    dt = F.softplus(r(B, T, H) - 3.0)
    A = -torch.rand(H, device=device, generator=g) * 4 - 0.5
    lam = torch.rand(B, T, H, device=device, generator=g)
    Bm, Cm = (r(B, T, H, 1, N) * N**-0.5).to(dtype), (r(B, T, H, 1, N) * N**-0.5).to(dtype)
    theta = r(B, T, H, N // 2)
    state = [r(B, H, N // 2), r(B, H, P, N) * 0.1, r(B, H, 1, N) * N**-0.5, r(B, H, 1, P)]
    return [x, dt, A, lam, Bm, Cm, theta, r(H), *state]


def timed(fn, device, budget_s=6.0, max_reps=20):
    """Median ms of fn() after one warm-up call; as many repetitions as fit in `budget_s` (at least 1)."""
    fn()
    first = wall_ms(fn, device)
    reps = max(1, min(max_reps, int(budget_s / max(first / 1e3, 1e-6))))
    return statistics.median([first] + [event_ms(fn, device) for _ in range(reps - 1)])


def _rel(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def outputs_and_grads(fn, inputs, seed):
    """Outputs and every gradient of sum(out * w_out) + sum(state * w_state), the weights float64 normals from `seed`
    (the same for every fn of the same output shapes)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out, state = fn(*leaves)
    gen = torch.Generator(device=out.device).manual_seed(seed)
    weights = [torch.randn(t.shape, device=t.device, generator=gen, dtype=torch.float64) for t in (out, state)]
    ((out.double() * weights[0]).sum() + (state.double() * weights[1]).sum()).backward()
    return [out.detach(), state.detach()] + [x.grad for x in leaves]


# ------------------------------------------------------------------------------------------------ the ops
def gdn_fn(impl, starts=None):
    from revival.ops.delta_rule import gated_delta_rule

    return lambda q, k, v, g, beta, state: gated_delta_rule(q, k, v, g, beta, state, impl=impl,
                                                            document_starts=starts)


def ssd_fn(impl, starts=None):
    from revival.ops.ssd import ssd

    return lambda x, dt, A, B, C, D, state: ssd(x, dt, A, B, C, D, state, impl=impl, document_starts=starts)


def mamba3_fn(impl, starts=None):
    """Mamba-3 on (inputs, four state parts) -> (y, the final state flattened into one (B, size) tensor)."""
    from revival.ops.mamba3 import mamba3

    def fn(*a):
        y, state = mamba3(*a[:8], state=tuple(a[8:]), impl=impl, document_starts=starts)
        return y, torch.cat([part.flatten(1) for part in state], dim=1)

    return fn


def fla_gdn():
    """fla's chunk_gated_delta_rule with revival's argument order (o, final state)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    def fn(q, k, v, g, beta, state):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)

    return fn


def mamba_ssd():
    """mamba-ssm's mamba_chunk_scan_combined with revival's argument order (y, final state)."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    def fn(x, dt, A, B, C, D, state):
        return mamba_chunk_scan_combined(x, dt, A, B, C, 64, D=D, initial_states=state, return_final_states=True)

    return fn


# ------------------------------------------------------------------------------------------------ the sections
def check(kind, B, T, H, D, expand_v, dtype, packed, device):
    """Triton vs the float64 chunkwise path: relative errors of outputs, final state and every gradient."""
    initial_states = 1
    if kind == "gdn":
        inputs = gdn_inputs(B, T, H, D, dtype, device, expand_v=expand_v)
        names, make = "o state dq dk dv dg dbeta dstate0", gdn_fn
        low = (0, 1, 2)
    elif kind == "ssd":
        inputs, names, make = ssd_inputs(B, T, H, D, dtype, device), "y state dx ddt dA dB dC dD dstate0", ssd_fn
        low = (0, 3, 4)
    else:
        inputs, names, make = mamba3_inputs(B, T, H, D, dtype, device), MAMBA3_NAMES, mamba3_fn
        low, initial_states = (0, 4, 5), 4
    gen = torch.Generator(device=device).manual_seed(1)
    ref_inputs = [x.double() for x in inputs]
    starts = None
    if packed:
        starts = torch.rand(B, T, device=device, generator=gen) < 1 / 700
        starts[0, 0] = True
    got = outputs_and_grads(make("triton", starts), inputs, 2)
    ref = outputs_and_grads(make("chunkwise", starts), ref_inputs, 2)
    errors = {name: _rel(g, r) for name, g, r in zip(names.split(), got, ref)}
    if packed:  # row 0 starts at t = 0: its initial state gets no gradient (zero in both)
        for index in range(-initial_states, 0):
            errors[names.split()[index]] = _rel(got[index][1:], ref[index][1:])
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    tol = 2e-2 if dtype != torch.float32 else 1e-3
    del got, ref
    shape = [B, T, H, D] + ([D * expand_v] if kind == "gdn" else [128] if kind == "mamba3" else [])
    return {"kind": kind, "shape": shape, "dtype": str(dtype).split(".")[-1], "packed": packed,
            "errors": errors,
            "finite": finite, "tolerance": tol, "ok": finite and max(errors.values()) < tol,
            "low_precision_inputs": [names.split()[2 + i] for i in low]}


def time_one(make, inputs, out_index, device):
    """(forward ms, forward+backward ms) of make() on inputs; gradients for every floating input."""
    fn = make()
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    grad_out = torch.randn_like(inputs[out_index])

    def forward():
        with torch.no_grad():
            fn(*leaves)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        out, state = fn(*leaves)
        (out * grad_out).sum().backward()

    return timed(forward, device), timed(forward_backward, device)


def timings(kind, B, T, H, D, device):
    if kind == "gdn":
        inputs, out_index = gdn_inputs(B, T, H, D, torch.bfloat16, device), 2
        candidates = {"revival_triton": lambda: gdn_fn("triton"), "revival_chunkwise": lambda: gdn_fn("chunkwise"),
                      "fla_chunk_gated_delta_rule": fla_gdn}
    else:
        inputs, out_index = ssd_inputs(B, T, H, D, torch.bfloat16, device), 0
        candidates = {"revival_triton": lambda: ssd_fn("triton"), "revival_chunkwise": lambda: ssd_fn("chunkwise"),
                      "mamba_ssm_chunk_scan_combined": mamba_ssd}
    rows = {name: timing_row(make, inputs, out_index, device, f"{kind} {B}x{T}x{H}x{D} {name}")
            for name, make in candidates.items()}
    add_ratio(rows, "speedup_triton_vs_chunkwise_fwd_bwd", "revival_chunkwise", "revival_triton")
    return {"kind": kind, "shape": [B, T, H, D], "dtype": "bfloat16", **rows}


def timing_row(make, inputs, out_index, device, label):
    """{fwd_ms, fwd_bwd_ms} of make(), or the ImportError / refusal / OOM recorded as such."""
    try:
        fwd, fwd_bwd = time_one(make, inputs, out_index, device)
        row = {"fwd_ms": round(fwd, 3), "fwd_bwd_ms": round(fwd_bwd, 3)}
    except ImportError as error:
        row = {"import_error": str(error)}
    except Exception as error:  # a refusal (e.g. fla on Hopper with an old Triton) or OOM: recorded as such
        row = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"  {label}: {row}", flush=True)
    return row


def add_ratio(rows, key, numerator, denominator):
    """rows[key] = fwd+bwd ms of rows[numerator] / rows[denominator], where both were timed."""
    top, bottom = rows[numerator], rows[denominator]
    if "fwd_bwd_ms" in top and "fwd_bwd_ms" in bottom:
        rows[key] = round(top["fwd_bwd_ms"] / bottom["fwd_bwd_ms"], 2)


def mamba3_timings(B, T, H, P, N, device):
    """Mamba-3 SISO Triton vs its chunkwise path, and SSD's Triton kernels at the same heads (N and the Mamba-2
    layer's N = 128): Mamba-3 runs SSD on 2H heads plus elementwise RoPE/shift passes."""
    m3 = mamba3_inputs(B, T, H, P, torch.bfloat16, device, N=N)
    rows = {name: timing_row(lambda impl=impl: mamba3_fn(impl), m3, 0, device, f"mamba3 {B}x{T}x{H}x{P}x{N} {name}")
            for name, impl in (("mamba3_triton", "triton"), ("mamba3_chunkwise", "chunkwise"))}
    del m3
    for n_state in dict.fromkeys((N, 128)):
        rows[f"ssd_triton_N{n_state}"] = timing_row(lambda: ssd_fn("triton"),
                                                    ssd_inputs(B, T, H, P, torch.bfloat16, device, N=n_state), 0,
                                                    device, f"ssd {B}x{T}x{H}x{P}x{n_state} triton")
    add_ratio(rows, "speedup_triton_vs_chunkwise_fwd_bwd", "mamba3_chunkwise", "mamba3_triton")
    add_ratio(rows, f"mamba3_triton_over_ssd_triton_N{N}_fwd_bwd", "mamba3_triton", f"ssd_triton_N{N}")
    add_ratio(rows, "mamba3_triton_over_ssd_triton_N128_fwd_bwd", "mamba3_triton", "ssd_triton_N128")
    return {"kind": "mamba3", "shape": [B, T, H, P, N], "dtype": "bfloat16", **rows}


def step_timings(B, H, D, device):
    """Decode: one token through the Triton step kernels vs the chunkwise path at T = 1 (no gradients)."""
    result = {"shape": [B, H, D]}
    gdn, ssd = gdn_inputs(B, 1, H, D, torch.bfloat16, device), ssd_inputs(B, 1, H, D, torch.bfloat16, device)
    m3 = mamba3_inputs(B, 1, H, D, torch.bfloat16, device)
    for kind, inputs, make in (("gdn", gdn, gdn_fn), ("ssd", ssd, ssd_fn), ("mamba3", m3, mamba3_fn)):
        for impl in ("triton", "chunkwise"):
            fn = make(impl)
            with torch.no_grad():
                ms = timed(lambda fn=fn, inputs=inputs: fn(*inputs), device, 1.0, 200)
            result[f"{kind}_{impl}_us"] = round(1e3 * ms, 1)
    return result


def parse_sections(text: str) -> list[str]:
    """The comma-separated section names of --sections, each one of SECTIONS, in the order given."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--sections: expected comma-separated names from {','.join(SECTIONS)}, got {text!r}")
    return list(dict.fromkeys(names))


def write(result: dict, path: str, begin: float, complete: bool) -> None:
    """gpu_siblings.json as measured so far (replaced whole, never half-written)."""
    result["seconds"], result["complete"] = round(time.perf_counter() - begin, 1), complete
    with open(path + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated sections to run, from {','.join(SECTIONS)} (default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: check the script itself (CPU: interpreter)")
    args = ap.parse_args()
    sections = parse_sections(args.sections)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("no CUDA device: run on a GPU, or with TRITON_INTERPRET=1 and --smoke to check the script")
    shapes, checks, steps, mamba3_shapes = SHAPES, CHECKS, STEP_SHAPES, MAMBA3_SHAPES
    if args.smoke:
        shapes, steps, mamba3_shapes = [(1, 40, 2, 16)], [(1, 2, 16)], [(1, 40, 2, 16, 16)]
        checks = [(2, 37, 2, 16, 2, torch.float32, True, ("gdn", "ssd")), (2, 37, 2, 16, 1, torch.float32, True,
                                                                         ("mamba3",))]
    import triton

    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "sections": sections, "checks": [], "timings": [], "steps": []}
    begin = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_siblings.json")
    for section in sections:
        if section == "checks":
            print("checks against float64:", flush=True)
            for B, T, H, D, expand_v, dtype, packed, kinds in checks:
                for kind in kinds:
                    try:
                        row = check(kind, B, T, H, D, expand_v, dtype, packed, device)
                    except Exception:
                        row = {"kind": kind, "shape": [B, T, H, D] + ([D * expand_v] if kind == "gdn" else []),
                               "dtype": str(dtype).split(".")[-1], "packed": packed,
                               "error": traceback.format_exc(limit=3)}
                    result["checks"].append(row)
                    print(f"  {row}", flush=True)
                    write(result, path, begin, False)
            result["all_checks_ok"] = all(row.get("ok", False) for row in result["checks"])
        elif section == "timings":
            print("timings (ms, bfloat16):", flush=True)
            for B, T, H, D in shapes:
                for kind in ("gdn", "ssd"):
                    result["timings"].append(timings(kind, B, T, H, D, device))
                    write(result, path, begin, False)
        elif section == "mamba3":
            print("Mamba-3 timings (ms, bfloat16):", flush=True)
            for B, T, H, P, N in mamba3_shapes:
                result["timings"].append(mamba3_timings(B, T, H, P, N, device))
                write(result, path, begin, False)
        else:
            print("decode steps:", flush=True)
            for B, H, D in steps:
                result["steps"].append(step_timings(B, H, D, device))
                print(f"  {result['steps'][-1]}", flush=True)
                write(result, path, begin, False)
    write(result, path, begin, True)
    print(f"wrote {path} ({result['seconds']} s; all checks ok: {result.get('all_checks_ok', 'not run')})",
          flush=True)


if __name__ == "__main__":
    main()
