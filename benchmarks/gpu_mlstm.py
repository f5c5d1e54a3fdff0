"""GPU benchmark of revival's Triton mLSTM kernels against the official ones (mlstm_kernels, fla) and SDPA flash.

Run on a CUDA machine:  python benchmarks/gpu_mlstm.py --out benchmarks/results [--quick]
It (1) measures the copy bandwidth and a bf16 matmul (the two ceilings), (2) checks revival's kernels against a
float64 reference at real shapes (fresh random inputs, outputs poisoned through the allocator), (3) times forward and
forward+backward (triton.testing.do_bench medians) for revival's config variants and the anchors, each anchor in its
own subprocess so that a crash is recorded as such, (4) times the decode step, (5) times the varlen row: the Triton
op on packed rows (~500-token documents, `document_starts`) against the same rows without starts, and writes
gpu_mlstm.json + .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F
from _timing import do_bench_ms, graphed_ms

TOKENS = 65536
SHAPES = [  # heads, Dk, Dv, T
    (16, 128, 128, 2048), (16, 128, 128, 8192), (16, 128, 128, 32768), (8, 256, 512, 8192),
]
# B, H, Dk, Dv: xLSTM-7B's layer at batch 16 and 1, and the 125M preset's
STEP_SHAPES = [(16, 8, 256, 512), (1, 8, 256, 512), (16, 4, 96, 192)]
CHECKS = [  # H, Dk, Dv, T, B, dtype, chunk, precision mode, initial state (with its gradient) or none
    (4, 128, 128, 2085, 2, torch.bfloat16, 64, "fast", True),
    (4, 128, 128, 2085, 2, torch.bfloat16, 64, "precise", True),
    (4, 128, 128, 2085, 2, torch.float32, 64, "fast", True),
    (4, 128, 128, 2085, 2, torch.bfloat16, 128, "fast", True),
    (2, 256, 512, 1029, 1, torch.bfloat16, 64, "fast", True),
    (2, 256, 512, 1029, 1, torch.bfloat16, 64, "precise", True),
    (2, 64, 256, 777, 2, torch.float16, 64, "fast", True), (4, 128, 128, 2085, 2, torch.bfloat16, 64, "fast32", True),
    (2, 256, 512, 1029, 1, torch.bfloat16, 64, "fast32", True),
    (4, 128, 128, 2085, 2, torch.bfloat16, 64, "balanced", True),
    (2, 256, 512, 1029, 1, torch.bfloat16, 64, "balanced", True),
    (8, 128, 128, 4097, 1, torch.bfloat16, 64, "balanced", True),
    (3, 96, 192, 2049, 2, torch.bfloat16, 64, "balanced", True),
    # "auto" without an initial state (training from the start of a sequence) takes "fast"; with one, "balanced"
    (4, 128, 128, 2085, 2, torch.bfloat16, 64, "auto", False),
    (2, 256, 512, 1029, 1, torch.bfloat16, 64, "auto", False),
    (8, 128, 128, 4097, 1, torch.bfloat16, 64, "auto", False),
    (3, 96, 192, 2049, 2, torch.bfloat16, 64, "auto", False),
    (16, 128, 128, 2048, 4, torch.bfloat16, 64, "auto", False),
    (2, 64, 256, 777, 2, torch.float16, 64, "auto", False), (4, 128, 128, 2085, 2, torch.bfloat16, 64, "auto", True),
]


def make_inputs(H, Dk, Dv, T, dtype=torch.bfloat16, B=None, seed=0):
    B = B or max(1, TOKENS // T)
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q, k, v = r(B, H, T, Dk).to(dtype), r(B, H, T, Dk).to(dtype), r(B, H, T, Dv).to(dtype)
    i, f = r(B, H, T), r(B, H, T) + 3.0
    return q, k, v, i, f


def poison():
    """Fill freed allocator blocks with NaN so that an unwritten output shows up."""
    free = torch.cuda.mem_get_info()[0]
    blob = torch.full((int(free * 0.3) // 4,), float("nan"), device="cuda")
    del blob


# ----------------------------------------------------------------------------------------------- revival
def revival_fns(H, Dk, Dv, T, chunk, dtype=torch.bfloat16, precision="auto", launch=None):
    from revival.ops.mlstm import mlstm

    q, k, v, i, f = make_inputs(H, Dk, Dv, T, dtype)
    xs = [x.requires_grad_(True) for x in (q, k, v, i, f)]
    dh = torch.randn_like(q[..., :1].expand(*q.shape[:-1], Dv).contiguous())

    def fwd():
        with torch.no_grad():
            return mlstm(*xs, impl="triton", chunk_size=chunk, precision=precision, launch=launch)[0]

    def fwdbwd():
        h, _ = mlstm(*xs, impl="triton", chunk_size=chunk, precision=precision, launch=launch)
        h.backward(dh)

    return fwd, fwdbwd, xs


def check(H, Dk, Dv, T, B, dtype, chunk, seed, with_state=True, precision="auto", launch=None):
    """Relative errors of h, final state and all gradients vs float64 (chunkwise form, which equals the recurrent);
    with_state=False: no initial state (zeros, no gradient), as in training from the start of a sequence."""
    from revival.ops.mlstm import mlstm

    q, k, v, i, f = make_inputs(H, Dk, Dv, T, dtype, B=B, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    state = (torch.randn(B, H, Dk, Dv, device="cuda", generator=g), torch.randn(B, H, Dk, device="cuda", generator=g),
             torch.randn(B, H, device="cuda", generator=g))
    state = state if with_state else ()
    weights = [torch.randn(B, H, T, Dv, device="cuda", generator=g, dtype=torch.float64),
               torch.randn(B, H, Dk, Dv, device="cuda", generator=g, dtype=torch.float64),
               torch.randn(B, H, Dk, device="cuda", generator=g, dtype=torch.float64)]

    def run(inputs, impl, poisoned):
        xs = [x.detach().clone().requires_grad_(True) for x in inputs]
        if poisoned:
            poison()
        h, (C, n, _) = mlstm(*xs[:5], tuple(xs[5:]) or None, impl=impl, chunk_size=chunk, precision=precision,
                             launch=launch)
        loss = sum((o.double() * w).sum() for o, w in zip((h, C, n), weights))
        if poisoned:
            poison()
        loss.backward()
        return [h.detach(), C.detach(), n.detach()] + [x.grad for x in xs]

    inputs = [q, k, v, i, f, *state]
    ref = run([x.double() for x in inputs], "chunkwise", False)
    got = run(inputs, "triton", True)
    names = ["h", "C", "n", "dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0"]
    err = {}
    for name, a, b in zip(names, got, ref):
        if not torch.isfinite(a).all():
            err[name] = float("nan")
        else:
            err[name] = ((a.double() - b).norm() / b.norm()).item()
    return err


# ----------------------------------------------------------------------------------------------- anchors
ANCHOR_CODE = r'''
import json, sys, torch
sys.path[:0] = ["benchmarks", "."]
from _timing import do_bench_ms
from gpu_mlstm import make_inputs, SHAPES
name = sys.argv[1]
res = {}
def emit():
    print("RESULT " + json.dumps(res), flush=True)
for (H, Dk, Dv, T) in SHAPES:
    key = f"{H},{Dk},{Dv},{T}"
    try:
        q, k, v, i, f = make_inputs(H, Dk, Dv, T)
        if name in ("limit_chunk", "xl_chunk"):
            from mlstm_kernels.torch import get_mlstm_kernel
            kern = get_mlstm_kernel("chunkwise--triton_" + name)
            call = lambda: kern(*xs, chunk_size=64 if name == "limit_chunk" else 128)
        elif name == "fla_simple_gla":
            if Dv != Dk:
                res[key] = "n/a"; emit(); continue
            from fla.ops.simple_gla import chunk_simple_gla
            q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
            i = torch.nn.functional.logsigmoid(f).transpose(1, 2).contiguous()
            call = lambda: chunk_simple_gla(xs[0], xs[1], xs[2], g=xs[3], scale=Dk ** -0.5)[0]
        if name != "fla_simple_gla":
            i, f = i.to(q.dtype), f.to(q.dtype)
        xs = [x.requires_grad_(True) for x in (q, k, v, i, f)]
        if name == "fla_simple_gla":
            xs = xs[:4]
        def fwd_fn():
            with torch.no_grad():
                call()
        def fb_fn():
            o = call()
            o = o[0] if isinstance(o, tuple) else o
            o.backward(dh)
        o = call(); o = o[0] if isinstance(o, tuple) else o
        dh = torch.randn_like(o)
        res[key] = {"fwd_ms": do_bench_ms(fwd_fn), "fwdbwd_ms": do_bench_ms(fb_fn, xs)}
    except Exception as e:
        res[key] = "error: " + type(e).__name__ + ": " + str(e)[:300]
    emit()
'''


def run_anchor(name: str, timeout: int) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-c", ANCHOR_CODE, name], capture_output=True, text=True,
                              timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        proc = None
    else:
        out = proc.stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(lines[-1][7:]) if lines else {}
    if proc is None:
        res["process"] = f"timed out after {timeout} s"
    elif proc.returncode != 0:
        res["process"] = f"crashed (exit {proc.returncode}): " + proc.stderr.strip()[-600:]
    return res


def sdpa_times():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    for (H, Dk, Dv, T) in SHAPES:
        key = f"{H},{Dk},{Dv},{T}"
        if Dk != Dv:
            res[key] = "n/a"
            continue
        q, k, v, _, _ = make_inputs(H, Dk, Dv, T)
        xs = [x.requires_grad_(True) for x in (q, k, v)]
        dh = torch.randn_like(q)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            def fwd(xs=xs):
                with torch.no_grad():
                    F.scaled_dot_product_attention(*xs, is_causal=True)

            def fb(xs=xs, dh=dh):
                F.scaled_dot_product_attention(*xs, is_causal=True).backward(dh)
            res[key] = {"fwd_ms": do_bench_ms(fwd), "fwdbwd_ms": do_bench_ms(fb, xs)}
    return res


def ceilings():
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench_ms(lambda: y.copy_(x))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = do_bench_ms(lambda: a @ b)
    return {"copy_TBps": 2 * x.numel() * 4 / ms / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / mm / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    # the default precision first, then the other presets (revival.ops.mlstm.PRECISIONS)
    ap.add_argument("--variants", default="L64:auto,L64:balanced,L64:fast32,L64:precise",
                    help="revival configs: L<chunk>:<precision>[:launch_field=value...]")
    ap.add_argument("--anchors-from", default="", help="reuse the anchors' timings of an earlier gpu_mlstm.json")
    ap.add_argument("--skip-sdpa", action="store_true")
    ap.add_argument("--anchors", default="limit_chunk,xl_chunk,fla_simple_gla")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-config", default="", help="LaunchConfig fields for the checks: field=value[:...]")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--skip-varlen", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import triton

    from revival.ops.mlstm.triton import LaunchConfig, mlstm_step_triton

    def launch_from(pairs: dict) -> LaunchConfig:  # e.g. {"warps_grad": 4}: LaunchConfig field names
        return LaunchConfig(**pairs)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "tokens_per_call": TOKENS, "dtype": "bfloat16"}
    for pkg in ("mlstm_kernels", "fla"):
        try:
            result[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001
            result[pkg] = f"not importable: {e}"
    result["ceilings"] = ceilings()
    print(result, flush=True)

    if not args.skip_check:
        checks = {}
        check_config = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in args.check_config.split(":") if kv}
        result["check_config"] = check_config
        for (H, Dk, Dv, T, B, dtype, chunk, mode, with_state) in CHECKS:
            key = f"H{H} Dk{Dk} Dv{Dv} T{T} B{B} {str(dtype)[6:]} L{chunk} {mode}" + ("" if with_state else " no-state")
            try:
                checks[key] = check(H, Dk, Dv, T, B, dtype, chunk, seed=int.from_bytes(os.urandom(2), "little"),
                                    with_state=with_state, precision=mode, launch=launch_from(check_config))
            except Exception:  # noqa: BLE001
                checks[key] = "error: " + traceback.format_exc()[-800:]
            print("check", key, checks[key], flush=True)
        result["checks"] = checks

    timings = {}
    for variant in args.variants.split(","):
        # L<chunk>:<mode>[:field=VALUE...] (LaunchConfig fields, e.g. warps_grad=4); a variant may name its shapes with
        # :T=<T> (only the (16,128,128) shape of that T)
        chunk, mode, *extra = variant.split(":")
        overrides = {kv.split("=")[0]: int(kv.split("=")[1]) for kv in extra}
        only_T = overrides.pop("T", None)
        launch = launch_from(overrides)
        res = {}
        for (H, Dk, Dv, T) in SHAPES:
            if only_T is not None and (T != only_T or Dk != 128):
                continue
            key = f"{H},{Dk},{Dv},{T}"
            try:
                fwd, fb, xs = revival_fns(H, Dk, Dv, T, int(chunk[1:]), precision=mode, launch=launch)
                res[key] = {"fwd_ms": do_bench_ms(fwd), "fwdbwd_ms": do_bench_ms(fb, xs)}
            except Exception as e:  # noqa: BLE001
                res[key] = "error: " + type(e).__name__ + ": " + str(e)[:300]
            print("revival", variant, key, res[key], flush=True)
            torch.cuda.empty_cache()
        timings["revival_" + variant] = res

    if not args.skip_step:
        result["step"] = step_time(mlstm_step_triton, result["ceilings"]["copy_TBps"])
    if not args.skip_varlen:
        try:
            result["varlen"] = varlen_times()
        except Exception:  # noqa: BLE001 - recorded, the other sections still run
            result["varlen"] = "error: " + traceback.format_exc()[-800:]
    if not args.skip_sdpa:
        timings["sdpa_flash"] = sdpa_times()
        print("sdpa", timings["sdpa_flash"], flush=True)
    for name in [a for a in args.anchors.split(",") if a]:
        timings[name] = run_anchor(name, timeout=150)
        print("anchor", name, timings[name], flush=True)
    if args.anchors_from:  # anchors measured in an earlier run on the same kind of machine
        with open(args.anchors_from) as fh:
            old = json.load(fh)
        for name, res in old["timings"].items():
            if not name.startswith("revival") and name not in timings:
                timings[name] = res
        result["anchors_from"] = {"file": args.anchors_from, "device": old["device"], "torch": old["torch"],
                                  "triton": old["triton"], "mlstm_kernels": old.get("mlstm_kernels"),
                                  "fla": old.get("fla"), "step": old.get("step")}
    result["timings"] = timings
    with open(os.path.join(args.out, "gpu_mlstm.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    plot(result, os.path.join(args.out, "gpu_mlstm.png"))
    table(result)


def varlen_times(mean_document=500):
    """The Triton op at the T = 8192 shapes on packed rows (exponential document lengths around `mean_document`,
    `document_starts`) against the same rows without starts: fwd and fwd+bwd ms and their ratio."""
    from gpu_packed import random_lengths

    from revival.ops._documents import from_lengths
    from revival.ops.mlstm import mlstm

    rows = {}
    for (H, Dk, Dv, T) in SHAPES:
        if T != 8192:
            continue
        xs = [x.requires_grad_(True) for x in make_inputs(H, Dk, Dv, T)]
        B = xs[0].shape[0]
        starts = from_lengths(random_lengths(B, T, mean_document, seed=2), device="cuda")
        dh = torch.randn(B, H, T, Dv, device="cuda", dtype=xs[0].dtype)
        row = {"documents": int(starts.sum()), "mean_document_tokens": B * T / int(starts.sum())}
        for name, document_starts in (("plain", None), ("packed", starts)):
            def fwd(xs=xs, document_starts=document_starts):
                with torch.no_grad():
                    return mlstm(*xs, impl="triton", document_starts=document_starts)[0]

            def fwdbwd(xs=xs, dh=dh, document_starts=document_starts):
                mlstm(*xs, impl="triton", document_starts=document_starts)[0].backward(dh)

            row[name] = {"fwd_ms": do_bench_ms(fwd), "fwdbwd_ms": do_bench_ms(fwdbwd, xs)}
        row["packed_over_plain_fwdbwd"] = row["packed"]["fwdbwd_ms"] / row["plain"]["fwdbwd_ms"]
        rows[f"{H},{Dk},{Dv},{T}"] = row
        print("varlen", f"{H},{Dk},{Dv},{T}", row, flush=True)
        torch.cuda.empty_cache()
    return rows


def step_time(step_fn, copy_tbps):
    """The decode step, eager (what a plain decode loop sees) and graphed, beside the official step in-process."""
    try:
        from mlstm_kernels.torch import get_mlstm_step_kernel

        official = get_mlstm_step_kernel("triton")
    except Exception as e:  # noqa: BLE001
        official, official_error = None, f"not importable: {type(e).__name__}: {e}"
    rows = []
    for (B, H, Dk, Dv) in STEP_SHAPES:
        g = lambda *s: torch.randn(*s, device="cuda")  # noqa: E731
        a = [g(B, H, Dk).bfloat16(), g(B, H, Dk).bfloat16(), g(B, H, Dv).bfloat16(), g(B, H), g(B, H) + 3]
        st = (g(B, H, Dk, Dv), g(B, H, Dk), g(B, H))
        ours = lambda a=a, st=st: step_fn(*a, st)  # noqa: E731
        row = {"shape_B_H_Dk_Dv": (B, H, Dk, Dv), "revival_ms": do_bench_ms(ours),
               "revival_graph_ms": graphed_ms(ours), "floor_ms": 2 * B * H * (Dk * Dv + Dk + 1) * 4 / (copy_tbps * 1e9)}
        if official is not None:
            oa = [*a[:3], a[3][..., None], a[4][..., None], st[0], st[1], st[2][..., None]]
            theirs = lambda oa=oa: official(*oa)  # noqa: E731
            row["official_ms"], row["official_graph_ms"] = do_bench_ms(theirs), graphed_ms(theirs)
            row["ratio_to_official"] = row["revival_ms"] / row["official_ms"]
        else:
            row["official"] = official_error
        row["ratio_to_floor"] = row["revival_ms"] / row["floor_ms"]
        print(f"step {B},{H},{Dk},{Dv}: revival {row['revival_ms']:.4f} ms (graphed {row['revival_graph_ms']:.4f}), "
              f"official {row.get('official_ms', float('nan')):.4f} ms, ratio to official "
              f"{row.get('ratio_to_official', float('nan')):.2f}, to the byte floor {row['ratio_to_floor']:.2f}",
              flush=True)
        rows.append(row)
    return rows


def table(result):
    t = result["timings"]
    print(f"\n{result['device']} torch {result['torch']} triton {result['triton']}  fwd+bwd ms (fwd ms)")
    for name, res in t.items():
        cells = []
        for (H, Dk, Dv, T) in SHAPES:
            r = res.get(f"{H},{Dk},{Dv},{T}", "-")
            cells.append(f"{r['fwdbwd_ms']:.2f} ({r['fwd_ms']:.2f})" if isinstance(r, dict) else str(r)[:24])
        print(f"{name:22s} " + " | ".join(cells))


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"H{H} {Dk}/{Dv}\nT={T}" for (H, Dk, Dv, T) in SHAPES]
    names = list(result["timings"])
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        vals = []
        for (H, Dk, Dv, T) in SHAPES:
            r = result["timings"][name].get(f"{H},{Dk},{Dv},{T}")
            vals.append(r["fwdbwd_ms"] if isinstance(r, dict) else 0.0)
        ax.bar([x + j * width for x in range(len(SHAPES))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(SHAPES))], labels)
    ax.set_ylabel("forward+backward ms (65,536 tokens, bf16); 0 = crash/refusal/n.a.")
    ax.set_title(f"mLSTM chunkwise on {result['device']} (triton {result['triton']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
