"""Fast CPU sLSTM: one batched matmul per step for all gates and heads, preallocated buffers, a hand-written backward.

The recurrence cannot be scanned, so each step is made cheap instead. The recurrent term of all four gates of all
heads is one `bmm`, head-major:

    rec[t] (H, B, 4d) = y[t-1] (H, B, d) @ R_fused (H, d, 4d),   R_fused[h][:, g*d:(g+1)*d] = R[g, h]

Everything else is stored gate-major, `(T, 4, H, B, d)` and `(T, H, B, d)`, so that every per-step elementwise op
reads and writes whole contiguous (H, B, d) blocks: on CPU a small op on a strided slice with 64-element rows costs
3-5x the same op on a contiguous block. The matmul result is added into the gate-major pre-activations in one
permuted add per step.

Forward step (14 ops): pre-activations, `ls = logsigmoid(f)` (saved: the backward's sigmoid(-f) is `-expm1(ls)`),
`logfm = ls + m_{t-1}` (written over f), m, (ibar, fbar) in one subtract and one exp, tanh z, c, n, sigmoid o, y.
Backward (`_backward_loop`): every local derivative depends only on saved values, so all are computed for all steps at
once before the loop; a step is one `bmm` over the 4H (gate, head) blocks and a sum over gates (the recurrent
gradient) and 11 elementwise ops on contiguous blocks. The weight gradient is four `bmm`s over all steps after the
loop. Same math as `reference.py` (first-step rule, ties pick `i`).

Document starts: at a step that starts a document (per batch row), the previous state is multiplied by 0 before the
step (so the first-step rule applies there), and in the backward nothing flows from that step into the previous one.

`slstm_fused_autograd` is the same forward without in-place buffers, differentiated by autograd; kept for the
benchmark comparison (`benchmarks/cpu_slstm.py`) and tested like the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import SLSTMState


def _fuse_weight(recurrent_weight: torch.Tensor) -> torch.Tensor:
    """(4, H, d, d) -> (H, d, 4d) with gate g in columns g*d:(g+1)*d."""
    G, H, d, _ = recurrent_weight.shape
    return recurrent_weight.permute(1, 2, 0, 3).reshape(H, d, G * d)


def _to_head_major(t: torch.Tensor) -> torch.Tensor:
    """(B, H, d) -> (H, B, d)."""
    return t.transpose(0, 1)


def _log_sigmoid_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """out = logsigmoid(x) without a temporary (the out= form of the op, where this torch exposes it)."""
    try:
        torch._C._nn.log_sigmoid(x, out=out)
    except (AttributeError, TypeError, RuntimeError):
        out.copy_(F.logsigmoid(x))


class _Buffers:
    """Everything one forward writes. Index 0 of c/n/m/y holds the initial state, index t+1 step t; (H, B, d) blocks.

    raw (T, 4, H, B, d): x, then the pre-activations (i, logfm, z, o) (f is overwritten by logfm = ls + m_{t-1});
    ls (T, H, B, d): logsigmoid(f); c, n, m, y (T+1, H, B, d); bars (T, 2, H, B, d): (ibar, fbar);
    tanh_z, sig_o (T, H, B, d).
    """

    def __init__(self, x_gates: torch.Tensor, initial: SLSTMState, keep: torch.Tensor | None = None):
        B, T, G, H, d = x_gates.shape
        kw = dict(dtype=x_gates.dtype, device=x_gates.device)
        self.keep = keep  # None, or (T, 1, B, 1): 0 where a document starts (the previous state is dropped)
        self.raw = torch.empty(T, G, H, B, d, **kw)
        self.raw.copy_(x_gates.permute(1, 2, 3, 0, 4))
        self.ls = torch.empty(T, H, B, d, **kw)
        self.c, self.n, self.m, self.y = (torch.empty(T + 1, H, B, d, **kw) for _ in range(4))
        for buffer, value in zip((self.c, self.n, self.m, self.y), initial):
            buffer[0].copy_(_to_head_major(value))
        self.bars = torch.empty(T, 2, H, B, d, **kw)
        self.tanh_z = torch.empty(T, H, B, d, **kw)
        self.sig_o = torch.empty(T, H, B, d, **kw)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.raw, self.ls, self.c, self.n, self.m, self.y, self.bars, self.tanh_z, self.sig_o


def _forward_loop(buf: _Buffers, R_fused: torch.Tensor) -> None:
    """Run the recurrence in place over `buf` (see `_Buffers`). R_fused: (H, d, 4d)."""
    raw, c, n, m, y = buf.raw, buf.c, buf.n, buf.m, buf.y
    T, G, H, B, d = raw.shape
    recurrent = raw.new_empty(H, B, G * d)
    recurrent_gate_major = recurrent.view(H, B, G, d).permute(2, 0, 1, 3)  # (4, H, B, d) view
    first = n[0] == 0
    check_first = bool(first.any())
    per_step = zip(
        raw.unbind(0), raw[:, 0:2].unbind(0), *(g.unbind(0) for g in raw.unbind(1)), buf.ls.unbind(0),
        c[1:].unbind(0), n[1:].unbind(0), m[1:].unbind(0), y[1:].unbind(0),
        buf.bars.unbind(0), buf.bars[:, 0].unbind(0), buf.bars[:, 1].unbind(0), buf.tanh_z.unbind(0),
        buf.sig_o.unbind(0),
    )  # fmt: skip
    c_prev, n_prev, m_prev, y_prev = c[0], n[0], m[0], y[0]
    starts_at = set() if buf.keep is None else set(torch.nonzero(buf.keep.flatten(1).amin(dim=1) == 0)[:, 0].tolist())
    for t, step in enumerate(per_step):
        raw_t, i_logfm, i, f, z, o, ls, c_new, n_new, m_new, y_new = step[:11]
        bars, i_bar, f_bar, tanh_z, sig_o = step[11:]
        restart = t in starts_at
        if restart:  # some rows start a document here: their previous state is zero
            c_prev, n_prev, m_prev, y_prev = (s * buf.keep[t] for s in (c_prev, n_prev, m_prev, y_prev))
            first = n_prev == 0
        torch.bmm(y_prev, R_fused, out=recurrent)
        raw_t.add_(recurrent_gate_major)
        _log_sigmoid_into(f, ls)
        torch.add(ls, m_prev, out=f)  # f's slot now holds logfm
        torch.maximum(i, f, out=m_new)
        check = (t == 0 and check_first) or restart
        if check:
            m_new.copy_(torch.where(first, i, m_new))
        torch.sub(i_logfm, m_new, out=bars)  # (i - m, logfm - m)
        bars.exp_()
        if check:
            f_bar.masked_fill_(first, 0.0)  # the memory is empty: fbar = 0 (exp may have overflowed there)
        torch.tanh(z, out=tanh_z)
        torch.mul(f_bar, c_prev, out=c_new).addcmul_(i_bar, tanh_z)
        torch.addcmul(i_bar, f_bar, n_prev, out=n_new)
        torch.mul(torch.sigmoid(o, out=sig_o), c_new, out=y_new).div_(n_new)
        c_prev, n_prev, m_prev, y_prev = c_new, n_new, m_new, y_new


def _backward_coefficients(raw, ls, c, n, m, y, bars, tanh_z, sig_o):
    """Per-step local derivatives, for all steps at once, each (T, H, B, d).

    With g_c, g_n = dL/dc_t, dL/dn_t (total) and g_m = dL/dm_t from later uses of m_t:
        dL/do = g_y * dy_do,  dL/dz = g_c * dc_dz,
        dL/di = g_c * k_c + g_n * k_n + g_m * s,  dL/dlogfm = g_m - dL/di,  dL/df = dL/dlogfm * sigmoid(-f)
    where s = [m_t == i] (the stabilizer took i) and (k_c, k_n) = (-fbar c_{t-1}, -fbar n_{t-1}) if s else
    (ibar tanh z, ibar): the stabilizer enters through ibar = exp(i - m), fbar = exp(logfm - m), and dL/dm_t is
    routed to i when s, else to logfm. The selections are exact blends a * s + b * (1 - s) with s in {0, 1} (all
    terms are finite), several times faster on CPU than `torch.where`.
    """
    i = raw[:, 0]
    i_bar, f_bar = bars[:, 0], bars[:, 1]
    n_new, y_new = n[1:], y[1:]
    s = torch.eq(i, m[1:], out=torch.empty_like(i))  # 1.0 where m = i (first step, or i >= logfm)
    not_s = torch.sub(1, s)
    dy_dc = sig_o / n_new
    dy_dn = torch.div(y_new, n_new).neg_()
    dy_do = torch.sub(1, sig_o).mul_(y_new)
    dc_dz = torch.mul(tanh_z, tanh_z).neg_().add_(1).mul_(i_bar)
    k_c = torch.mul(i_bar, tanh_z).mul_(not_s).addcmul_(torch.mul(f_bar, c[:-1]), s, value=-1)
    k_n = torch.mul(i_bar, not_s).addcmul_(torch.mul(f_bar, n[:-1]), s, value=-1)
    sig_neg_f = torch.expm1(ls).neg_()  # sigmoid(-f) = 1 - exp(logsigmoid(f)), exact where it is tiny
    return dy_dc, dy_dn, dy_do, dc_dz, k_c, k_n, s, sig_neg_f, f_bar


def _backward_loop(saved, R_gates_t, grad_y, grad_c, grad_n, grad_m, keep=None):
    """Backward through time. R_gates_t: (4H, d, d), R[g, h]^T. grad_y: (T, H, B, d), the final-state y gradient
    already added to step T-1; grad_c, grad_n, grad_m (H, B, d): gradients of the final state. Returns the gate
    gradients (T, 4, H, B, d) and the initial-state gradients (g_c0, g_n0, g_m0, g_y0).

    The recurrent gradient dL/dy_{t-1} = grad_y[t-1] + sum_g g_raw[t, g] @ R[g]^T is one bmm over the 4H (gate, head)
    blocks of the gate-major gradients plus a sum over gates, so no per-step layout change is needed.
    keep (T, 1, B, 1) or None: 0 where a step starts a document, which passes no gradient to the state before it.
    """
    raw = saved[0]
    T, G, H, B, d = raw.shape
    kw = dict(dtype=raw.dtype, device=raw.device)
    dy_dc, dy_dn, dy_do, dc_dz, k_c, k_n, s, sig_neg_f, f_bar = _backward_coefficients(*saved)
    g_raw = torch.empty(T, G, H, B, d, **kw)
    per_gate = torch.empty(G, H, B, d, **kw)  # g_raw[t + 1, g] @ R[g]^T
    g_c = grad_c.clone(memory_format=torch.contiguous_format)  # running dL/dc, dL/dn
    g_n = grad_n.clone(memory_format=torch.contiguous_format)
    g_y = torch.empty(H, B, d, **kw)
    g_m, g_logfm = grad_m.clone(memory_format=torch.contiguous_format), torch.empty(H, B, d, **kw)
    for t in range(T - 1, -1, -1):
        g_i, g_f, g_z, g_o = g_raw[t].unbind(0)
        if t == T - 1:
            g_y.copy_(grad_y[t])
        else:
            torch.bmm(g_raw[t + 1].view(G * H, B, d), R_gates_t, out=per_gate.view(G * H, B, d))
            torch.sum(per_gate, dim=0, out=g_y)
            if keep is not None:
                g_y.mul_(keep[t + 1])
            g_y.add_(grad_y[t])
        g_c.addcmul_(g_y, dy_dc[t])  # total dL/dc_t, dL/dn_t
        g_n.addcmul_(g_y, dy_dn[t])
        torch.mul(g_y, dy_do[t], out=g_o)
        torch.mul(g_c, dc_dz[t], out=g_z)
        torch.mul(g_c, k_c[t], out=g_i).addcmul_(g_n, k_n[t]).addcmul_(g_m, s[t])
        torch.sub(g_m, g_i, out=g_logfm)
        torch.mul(g_logfm, sig_neg_f[t], out=g_f)
        g_c.mul_(f_bar[t])  # dL/dc_{t-1}, dL/dn_{t-1}
        g_n.mul_(f_bar[t])
        g_m, g_logfm = g_logfm, g_m  # dL/dm_{t-1} = dL/dlogfm_t
        if keep is not None:  # (dL/dc, dL/dn are already 0 there: fbar = 0 on a first step)
            g_m.mul_(keep[t])
    torch.bmm(g_raw[0].view(G * H, B, d), R_gates_t, out=per_gate.view(G * H, B, d))
    g_y0 = per_gate.sum(dim=0) if keep is None else per_gate.sum(dim=0).mul_(keep[0])
    return g_raw, (g_c, g_n, g_m, g_y0)


class _SLSTMFunction(torch.autograd.Function):
    """Inputs in the computation dtype: x_gates (B, T, 4, H, d), recurrent_weight (4, H, d, d), c0, n0, m0, y0
    (B, H, d). Outputs: y (B, T, H, d) and the final c, n, m, y (B, H, d)."""

    @staticmethod
    def forward(ctx, x_gates, recurrent_weight, c0, n0, m0, y0, keep):
        T = x_gates.shape[1]
        buf = _Buffers(x_gates, (c0, n0, m0, y0), keep)
        _forward_loop(buf, _fuse_weight(recurrent_weight))
        ctx.keep = keep
        ctx.save_for_backward(recurrent_weight, *buf.tensors())
        y = buf.y[1:].permute(2, 0, 1, 3).contiguous()
        final = [buf.c[T], buf.n[T], buf.m[T], buf.y[T]]
        return (y, *(_to_head_major(s).contiguous() for s in final))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_c, grad_n, grad_m, grad_y_last):
        recurrent_weight, *saved = ctx.saved_tensors
        raw, y_all = saved[0], saved[5]
        T, G, H, B, d = raw.shape
        grad_y = grad_y.permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format)  # (T, H, B, d), owned
        grad_y[T - 1].add_(_to_head_major(grad_y_last))
        finals = (_to_head_major(g) for g in (grad_c, grad_n, grad_m))
        R_gates_t = recurrent_weight.reshape(G * H, d, d).transpose(1, 2)
        g_raw, g_states = _backward_loop(saved, R_gates_t, grad_y, *finals, keep=ctx.keep)
        g_x = g_r = None
        if ctx.needs_input_grad[0]:
            g_x = g_raw.permute(3, 0, 1, 2, 4)  # (B, T, 4, H, d)
        if ctx.needs_input_grad[1]:  # dL/dR[g, h] = sum over steps and batch of y_{t-1}[h]^T g_raw[t, g, h]
            y_prev = y_all[:T] if ctx.keep is None else y_all[:T] * ctx.keep  # what each step read
            y_prev = y_prev.permute(1, 3, 0, 2).reshape(H, d, T * B)
            g_gates = g_raw.permute(1, 2, 0, 3, 4).reshape(G, H, T * B, d)
            g_r = torch.empty_like(recurrent_weight)
            for g in range(G):
                torch.bmm(y_prev, g_gates[g], out=g_r[g])
        return (g_x, g_r, *(_to_head_major(g) for g in g_states), None)


def slstm_fused(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState,
                document_starts: torch.Tensor | None = None):
    """Fast path with the hand-written backward. Shapes as `slstm_reference`; inputs in the computation dtype."""
    keep = None
    if document_starts is not None and bool(document_starts.any()):
        keep = (~document_starts).to(x_gates.dtype).t()[:, None, :, None]  # (T, 1, B, 1)
    y, c, n, m, y_last = _SLSTMFunction.apply(x_gates, recurrent_weight, *state, keep)
    return y, (c, n, m, y_last)


def slstm_fused_autograd(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState):
    """The same head-major batched step, written out of place and differentiated by autograd."""
    B, T, G, H, d = x_gates.shape
    R_fused = _fuse_weight(recurrent_weight)
    x_steps = x_gates.permute(1, 3, 0, 2, 4).reshape(T, H, B, G * d).unbind(0)  # unbind: a cheap backward
    c, n, m, y = (_to_head_major(s) for s in state)
    first = n == 0
    outputs = []
    for t, x_t in enumerate(x_steps):
        raw = torch.baddbmm(x_t, y, R_fused).view(H, B, G, d)
        i, f, z, o = raw.unbind(2)
        log_f_plus_m = F.logsigmoid(f) + m
        if t == 0:
            m = torch.where(first | (i >= log_f_plus_m), i, log_f_plus_m)
            f_bar = torch.exp(torch.where(first, float("-inf"), log_f_plus_m - m))
        else:
            m = torch.where(i >= log_f_plus_m, i, log_f_plus_m)
            f_bar = torch.exp(log_f_plus_m - m)
        i_bar = torch.exp(i - m)
        c = f_bar * c + i_bar * torch.tanh(z)
        n = f_bar * n + i_bar
        y = torch.sigmoid(o) * c / n
        outputs.append(y)
    y_seq = torch.stack(outputs, dim=0).permute(2, 0, 1, 3)
    return y_seq, tuple(_to_head_major(s) for s in (c, n, m, y))
