"""GPU benchmark of the causal depthwise conv: impl="triton" (revival/ops/conv/triton.py) against impl="shifted"
(K shifted multiply-adds, revival/ops/conv/shifted.py) at the 125M training shapes.

Run on a CUDA machine:  python benchmarks/gpu_conv.py --out $OUT   (about a minute)
Per shape (B, T, D) (default (16, 2048, 3072): Gated DeltaNet; (16, 2048, 1792): Mamba-2), bf16, K = 4, SiLU, no
carried state, with and without document starts (~450-token documents): the forward (autograd on, as in training)
and forward+backward medians (triton.testing.do_bench), the bytes floor (forward: read x, write y; backward: read x
and dy, write dx) at the measured copy bandwidth, and a check of the Triton results against the shifted path run in
float32 (relative error in norm). Then one decode step (T = 1, carried state, no autograd) per impl, host time per
call, which is what "auto" keeps on "shifted" for now. Writes gpu_conv.json to --out after every row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from _timing import do_bench_ms, median_ms, wall_ms  # noqa: E402

from revival.bench.report import environment, write_json  # noqa: E402
from revival.ops._documents import from_lengths  # noqa: E402
from revival.ops.conv import causal_conv1d  # noqa: E402

K = 4
IMPLS = ("shifted", "triton")


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BxTxD with positive integers, got {text!r}")
    return tuple(int(p) for p in parts)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "runs"))
    parser.add_argument("--shapes", type=lambda s: [_shape(p) for p in s.split(",")],
                        default=[(16, 2048, 3072), (16, 2048, 1792)], help="comma-separated BxTxD")
    parser.add_argument("--document-length", type=int, default=450, help="tokens per packed document")
    return parser.parse_args(argv)


def document_starts(B: int, T: int, length: int, device) -> torch.Tensor:
    """Rows of `length`-token documents, each row's first one cut short by a different amount (starts not aligned
    across rows), the last one the remainder."""
    rows = []
    for row in range(B):
        first = 1 + (row * 97) % length
        lengths = [min(first, T)]
        while sum(lengths) < T:
            lengths.append(min(length, T - sum(lengths)))
        rows.append(lengths)
    return from_lengths(rows, device=device)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(256 * 2**20, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (do_bench_ms(lambda: dst.copy_(src)) * 1e-3)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def check(x, weight, bias, starts) -> dict:
    """Triton in bf16 vs the shifted path on the same values in float32: y and the gradients of x, weight, bias."""
    dy = torch.randn_like(x)
    results = {}
    for impl, dtype in (("triton", torch.bfloat16), ("shifted", torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, bias)]
        y, _ = causal_conv1d(*leaves, activation="silu", document_starts=starts, impl=impl)
        y.backward(dy.to(dtype))
        results[impl] = [y.detach()] + [t.grad for t in leaves]
    return {name: rel(a, b) for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_bias"), *results.values())}


def time_training(x, weight, bias, starts, impl) -> dict:
    dy = torch.randn_like(x)

    def forward():
        return causal_conv1d(x, weight, bias, activation="silu", document_starts=starts, impl=impl)[0]

    def forward_backward():
        forward().backward(dy)

    forward_ms = do_bench_ms(forward)
    forward_backward_ms = do_bench_ms(forward_backward, grads=[x, weight, bias])
    return {"forward_ms": forward_ms, "forward_backward_ms": forward_backward_ms,
            "backward_ms": forward_backward_ms - forward_ms}


def time_decode(B, D, impl) -> float:
    x = torch.randn(B, 1, D, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(D, K, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(B, K - 1, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        return median_ms(lambda: causal_conv1d(x, weight, bias, state, activation="silu", impl=impl), "cuda", 200,
                         clock=wall_ms)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    result = {"what": "causal conv, triton vs shifted: bf16, K=4, SiLU, no state (ms; rel errors vs shifted in fp32)",
              "environment": environment(torch.device("cuda")), "copy_bandwidth_bytes_per_s": bandwidth,
              "document_length": args.document_length, "rows": {}}
    path = os.path.join(args.out, "gpu_conv.json")
    os.makedirs(args.out, exist_ok=True)
    begin = time.time()
    for B, T, D in args.shapes:
        x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(D, K, device="cuda") / K**0.5).bfloat16().requires_grad_()
        bias = (torch.randn(D, device="cuda") * 0.1).bfloat16().requires_grad_()
        tensor_bytes = B * T * D * x.element_size()
        floor = {"forward_bytes": 2 * tensor_bytes, "backward_bytes": 3 * tensor_bytes,
                 "forward_floor_ms": 2 * tensor_bytes / bandwidth * 1e3,
                 "forward_backward_floor_ms": 5 * tensor_bytes / bandwidth * 1e3}
        for documents in (False, True):
            starts = document_starts(B, T, args.document_length, "cuda") if documents else None
            key = f"{B}x{T}x{D}/{'documents' if documents else 'no_documents'}"
            entry = {"floor": floor, "check_triton_vs_shifted_fp32": check(x, weight, bias, starts)}
            for impl in IMPLS:
                entry[impl] = time_training(x, weight, bias, starts, impl)
            entry["speedup_forward_backward"] = (entry["shifted"]["forward_backward_ms"]
                                                 / entry["triton"]["forward_backward_ms"])
            result["rows"][key] = entry
            print(f"{key}: shifted {entry['shifted']}, triton {entry['triton']}, floor {floor}, "
                  f"check {entry['check_triton_vs_shifted_fp32']}  ({time.time() - begin:.0f} s)", flush=True)
            write_json(result, path)
        result["rows"][f"decode/{B}x1x{D}"] = {f"{impl}_host_ms": time_decode(B, D, impl) for impl in IMPLS}
        print(f"decode/{B}x1x{D}: {result['rows'][f'decode/{B}x1x{D}']}", flush=True)
        write_json(result, path)
        del x, weight, bias
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
