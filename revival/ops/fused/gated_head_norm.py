"""A gated per-head norm output stage: gate(o) * (per-head norm(h) * weight + bias), or with the gate first.

`gated_head_norm(h, o, weight, bias, eps, kind=, gate=, gate_before_norm=False)` with h (..., H, D), o (..., H * D)
-> (..., H * D) in h's dtype. Each head's D features are normalized (eps inside the square root; kind "layer" removes
the mean first, as the xLSTM-7B layer's LayerNorm, kind "rms" does not, as Gated DeltaNet's RMSNorm), then scaled by
weight (H * D) and shifted by bias (or none), then gated by sigmoid(o) (gate "sigmoid", xLSTM-7B) or silu(o) (gate
"silu", Gated DeltaNet). `gate_before_norm=True` gates h first and normalizes the product, norm(h * gate(o)) * weight
+ bias (Mamba-2's grouped RMSNorm of y * silu(z), H the groups). `gated_head_norm_reference` is either in float32
(float64 for float64 inputs) in PyTorch. On CUDA one Triton pass each way (`_GatedHeadNormFunction`) replaces the
float32 copies and the ~8 elementwise passes forward and ~12 backward that the PyTorch form takes, computing in
float32 and rounding once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import compute_dtype, use_fused_kernel
from .._triton import HAVE_TRITON, INTERPRET

if HAVE_TRITON:
    import triton
    import triton.language as tl

__all__ = ["gated_head_norm", "gated_head_norm_reference"]


KINDS = ("layer", "rms")
GATES = ("sigmoid", "silu")


def gated_head_norm_reference(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                              eps: float, *, kind: str = "layer", gate: str = "sigmoid",
                              gate_before_norm: bool = False) -> torch.Tensor:
    """gate(o) * (LayerNorm (kind "layer") or RMSNorm (kind "rms") over each head's D features of h, times weight,
    plus bias), gate sigmoid or silu; with `gate_before_norm` the norm of h * gate(o) times weight plus bias. In
    float32 (float64 for float64 inputs), returned in h's dtype. h: (..., H, D); o: (..., H * D); weight, bias:
    (H * D,)."""
    _check_options(kind, gate)
    compute = compute_dtype(h)
    normalize = F.layer_norm if kind == "layer" else F.rms_norm
    activation = torch.sigmoid if gate == "sigmoid" else F.silu
    g = activation(o.to(compute))
    x = h.to(compute) * g.reshape(h.shape) if gate_before_norm else h.to(compute)
    y = normalize(x, (h.shape[-1],), eps=eps).flatten(-2) * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return (y if gate_before_norm else g * y).to(h.dtype)


def gated_head_norm(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    eps: float, *, kind: str = "layer", gate: str = "sigmoid", gate_before_norm: bool = False,
                    impl: str = "auto") -> torch.Tensor:
    """`gated_head_norm_reference`; impl "auto" runs it by the Triton kernels on CUDA (float32/bfloat16/float16),
    "triton" forces them (on the CPU under TRITON_INTERPRET=1), "reference" the PyTorch form."""
    _check_options(kind, gate)
    *lead, H, D = h.shape
    if o.shape != (*lead, H * D):
        raise ValueError(f"o: expected shape {(*lead, H * D)} for h of shape {tuple(h.shape)}, got {tuple(o.shape)}")
    if weight.shape != (H * D,) or (bias is not None and bias.shape != (H * D,)):
        raise ValueError(f"weight, bias: expected shape ({H * D},), got {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    supported = HAVE_TRITON and (h.is_cuda or INTERPRET) and h.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if not use_fused_kernel(impl, supported, h.is_cuda, f"h: {h.dtype} on {h.device.type}"):
        return gated_head_norm_reference(h, o, weight, bias, eps, kind=kind, gate=gate,
                                         gate_before_norm=gate_before_norm)
    out = _GatedHeadNormFunction.apply(h.reshape(-1, H * D), o.reshape(-1, H * D), weight, bias, H, eps,
                                       kind == "rms", gate == "silu", bool(gate_before_norm))
    return out.view(*lead, H * D)


def _check_options(kind: str, gate: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if gate not in GATES:
        raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")


def _rows_per_program(D: int) -> int:
    return max(1, 8192 // triton.next_power_of_2(D))


if HAVE_TRITON:

    @triton.jit
    def _tile(h_ptr, o_ptr, w_ptr, b_ptr, N, D, h_stride, o_stride, eps, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
              SILU: tl.constexpr, GATE_FIRST: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """This program's (block of BN rows, head) tile: rows, feature offsets, masks, h, the normalized input (h, or
        h * gate with GATE_FIRST), its reciprocal standard deviations (RMS: root mean squares) per row, w,
        y = norm * w + b, the gate sigmoid(o) or silu(o) and its derivative in o, all float32."""
        rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        cols = tl.arange(0, BD)
        cmask = cols < D
        mask = (rows < N)[:, None] & cmask[None, :]
        feat = tl.program_id(1) * D + cols
        x = tl.load(h_ptr + rows[:, None] * h_stride + feat[None, :], mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + rows[:, None] * o_stride + feat[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-o))
        if SILU:
            gate = o * sig
            dgate = sig * (1.0 + o * (1.0 - sig))
        else:
            gate = sig
            dgate = sig * (1.0 - sig)
        if GATE_FIRST:
            u = x * gate
        else:
            u = x
        if RMS:
            centered = u
        else:
            centered = tl.where(mask, u - (tl.sum(u, 1) / D)[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 1) / D + eps)
        norm = centered * rstd[:, None]
        w = tl.load(w_ptr + feat, mask=cmask, other=0.0).to(tl.float32)
        y = norm * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + feat, mask=cmask, other=0.0).to(tl.float32)[None, :]
        return rows, feat, mask, cmask, x, norm, rstd, w, y, gate, dgate

    @triton.jit
    def _gated_head_norm_kernel(h_ptr, o_ptr, w_ptr, b_ptr, out_ptr, N, D, h_stride, o_stride, out_stride, eps,
                                HAS_BIAS: tl.constexpr, RMS: tl.constexpr, SILU: tl.constexpr,
                                GATE_FIRST: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        """One (block of BN rows, head): out = gate(o) * (norm(h) * w + b) over the head's D features, or
        norm(h * gate(o)) * w + b with GATE_FIRST."""
        rows, feat, mask, _, _, _, _, _, y, gate, _ = _tile(h_ptr, o_ptr, w_ptr, b_ptr, N, D, h_stride, o_stride, eps,
                                                            HAS_BIAS, RMS, SILU, GATE_FIRST, BN, BD)
        if not GATE_FIRST:
            y = gate * y
        tl.store(out_ptr + rows[:, None] * out_stride + feat[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_head_norm_backward_kernel(h_ptr, o_ptr, w_ptr, b_ptr, dout_ptr, dh_ptr, do_ptr, dw_ptr, db_ptr,
                                         N, D, HD, h_stride, o_stride, dout_stride, eps, HAS_BIAS: tl.constexpr,
                                         RMS: tl.constexpr, SILU: tl.constexpr, GATE_FIRST: tl.constexpr,
                                         BN: tl.constexpr, BD: tl.constexpr):
        """Gradients of h and o for a (block of rows, head), and this block's sums for weight and bias
        (dw_ptr, db_ptr: (blocks, H * D) float32, reduced afterwards)."""
        block = tl.program_id(0)
        rows, feat, mask, cmask, x, norm, rstd, w, y, gate, dgate = _tile(
            h_ptr, o_ptr, w_ptr, b_ptr, N, D, h_stride, o_stride, eps, HAS_BIAS, RMS, SILU, GATE_FIRST, BN, BD)
        dout = tl.load(dout_ptr + rows[:, None] * dout_stride + feat[None, :], mask=mask, other=0.0).to(tl.float32)
        if GATE_FIRST:
            dy = dout
        else:
            dy = dout * gate
        dnorm = dy * w[None, :]
        du = dnorm - norm * (tl.sum(dnorm * norm, 1) / D)[:, None]
        if not RMS:  # the mean's removal: project out the constant direction too
            du -= tl.sum(dnorm, 1)[:, None] / D
        du = du * rstd[:, None]
        if GATE_FIRST:  # u = h * gate(o)
            dx = du * gate
            d_o = du * x * dgate
        else:
            dx = du
            d_o = dout * y * dgate
        offsets = rows[:, None] * HD + feat[None, :]
        tl.store(dh_ptr + offsets, dx.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(do_ptr + offsets, d_o.to(do_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + block * HD + feat, tl.sum(dy * norm, 0), mask=cmask)
        if HAS_BIAS:
            tl.store(db_ptr + block * HD + feat, tl.sum(dy, 0), mask=cmask)


class _GatedHeadNormFunction(torch.autograd.Function):
    """h2, o2: (N, H * D) with contiguous rows (any row stride); out (N, H * D) contiguous in h's dtype."""

    @staticmethod
    def forward(ctx, h2, o2, weight, bias, H, eps, rms, silu, gate_first):
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        if o2.stride(-1) != 1:
            o2 = o2.contiguous()
        N, HD = h2.shape
        D = HD // H
        BN = _rows_per_program(D)
        out = torch.empty(N, HD, device=h2.device, dtype=h2.dtype)
        _gated_head_norm_kernel[(triton.cdiv(N, BN), H)](
            h2, o2, weight, bias if bias is not None else weight, out, N, D, h2.stride(0), o2.stride(0), out.stride(0),
            eps, HAS_BIAS=bias is not None, RMS=rms, SILU=silu, GATE_FIRST=gate_first, BN=BN,
            BD=triton.next_power_of_2(D), num_warps=8,
        )
        ctx.save_for_backward(h2, o2, weight, bias)
        ctx.H, ctx.eps, ctx.rms, ctx.silu, ctx.gate_first = H, eps, rms, silu, gate_first
        return out

    @staticmethod
    def backward(ctx, dout):
        h2, o2, weight, bias = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        N, HD = h2.shape
        H = ctx.H
        D = HD // H
        BN = _rows_per_program(D)
        blocks = triton.cdiv(N, BN)
        dh = torch.empty(N, HD, device=h2.device, dtype=h2.dtype)
        do = torch.empty(N, HD, device=h2.device, dtype=o2.dtype)
        dw = torch.empty(blocks, HD, device=h2.device, dtype=torch.float32)
        db = torch.empty(blocks, HD, device=h2.device, dtype=torch.float32) if bias is not None else dw
        _gated_head_norm_backward_kernel[(blocks, H)](
            h2, o2, weight, bias if bias is not None else weight, dout, dh, do, dw, db, N, D, HD,
            h2.stride(0), o2.stride(0), dout.stride(0), ctx.eps,
            HAS_BIAS=bias is not None, RMS=ctx.rms, SILU=ctx.silu, GATE_FIRST=ctx.gate_first, BN=BN,
            BD=triton.next_power_of_2(D), num_warps=8,
        )
        dweight = dw.sum(0).to(weight.dtype)
        dbias = db.sum(0).to(bias.dtype) if bias is not None else None
        return dh, do, dweight, dbias, None, None, None, None, None
