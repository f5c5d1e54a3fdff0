"""Minimal form of the delta rule `_wy_grads_kernel` Dv loop that hit "illegal memory access" on the H200 (Triton
3.6, float32, chunk 64, Dv-tile 16, 8 warps): a product's result (L, BV) fed straight into a second product with a
(BV, L) operand read transposed from memory, K = BV. Each variant runs in its own process (an illegal access poisons
the CUDA context); prints ok + max error against float64, or the exit status. Run on the GPU:

    python benchmarks/triton_tf32x3_smem_repro.py            # ~30 s; add compute-sanitizer for the memcheck lines
"""

import subprocess
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def chained(t_ptr, du_ptr, u_ptr, out_ptr, DV, L: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    offs = tl.arange(0, L)
    inverse_T = tl.load(t_ptr + offs[None, :] * L + offs[:, None])
    acc = tl.zeros((L, L), tl.float32)
    for start in range(0, DV, BV):
        offs_v = start + tl.arange(0, BV)
        du = tl.load(du_ptr + offs[:, None] * DV + offs_v[None, :], mask=(offs_v < DV)[None, :], other=0.0)
        dv = tl.dot(inverse_T, du, input_precision=PRECISION)  # backward.py:205
        u_cols = tl.load(u_ptr + offs[None, :] * DV + offs_v[:, None], mask=(offs_v < DV)[:, None], other=0.0)
        acc -= tl.dot(dv, u_cols, input_precision=PRECISION)  # backward.py:209
    tl.store(out_ptr + offs[:, None] * L + offs[None, :], acc)


def one(precision: str, BV: int, warps: int, Dv: int = 16, L: int = 64) -> None:
    gen = torch.Generator().manual_seed(0)
    t, du, u = (torch.randn(*shape, generator=gen).cuda() for shape in ((L, L), (L, Dv), (L, Dv)))
    out = torch.empty(L, L, device="cuda")
    chained[(1,)](t, du, u, out, Dv, L=L, BV=BV, PRECISION=precision, num_warps=warps, num_stages=1)
    torch.cuda.synchronize()
    ref = -(t.double().T @ du.double()) @ u.double().T
    print(f"ok  err {(out.double() - ref).abs().max().item() / ref.abs().max().item():.1e}", flush=True)


VARIANTS = [("tf32x3", 16, 8), ("tf32x3", 32, 8), ("tf32x3", 16, 4), ("tf32", 16, 8), ("ieee", 16, 8)]

if __name__ == "__main__":
    if len(sys.argv) > 1:
        one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    print(f"triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for precision, BV, warps in VARIANTS:
        done = subprocess.run([sys.executable, __file__, precision, str(BV), str(warps)], capture_output=True,
                              text=True, timeout=300)
        result = done.stdout.strip() if done.returncode == 0 else f"FAILED rc={done.returncode}: " + (
            done.stderr.strip().splitlines() or ["?"])[-1][:120]
        print(f"{precision:7s} BV={BV:2d} warps={warps}: {result}", flush=True)
