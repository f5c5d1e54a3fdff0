"""Fast CPU sLSTM: one batched matmul per step for all gates and heads, preallocated buffers, a hand-written backward.

The recurrence cannot be scanned, so each step is made cheap instead. Everything is laid out head-major,
`(H, B, ., d)`, so that the recurrent term of all four gates of all heads is one `baddbmm`:

    raw[t] (H, B, 4d) += y[t-1] (H, B, d) @ R_fused (H, d, 4d),   R_fused[h][:, g*d:(g+1)*d] = R[g, h]

The forward writes pre-activations, c, n, m, y, (ibar, fbar), tanh z and sigmoid o of every step into
preallocated buffers (in place, 13 ops a step). The backward (`_SLSTMFunction.backward`) is a backward-through-time
loop: every local derivative depends only on saved values, so all of them are computed for all steps at once before
the loop, and a step is one `baddbmm` (`g_raw[t+1] @ R_fused^T` feeding `g_y[t]`) plus 8 elementwise ops. The weight
gradient is one `bmm` over all steps after the loop. Same math as `reference.py` (first-step rule, ties pick `i`).

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


class _Buffers:
    """Everything one forward writes, head-major. Index 0 of cn/m/y holds the initial state, index t+1 step t.

    raw (T, H, B, 4, d): x, then the pre-activations; cn (T+1, H, B, 2, d): (c, n); m, y (T+1, H, B, d);
    bars (T, H, B, 2, d): (ibar, fbar); tanh_z_one (T, H, B, 2, d): (tanh z, 1); sig_o (T, H, B, d).
    """

    def __init__(self, x_gates: torch.Tensor, initial: SLSTMState):
        B, T, G, H, d = x_gates.shape
        kw = dict(dtype=x_gates.dtype, device=x_gates.device)
        self.raw = torch.empty(T, H, B, G, d, **kw)
        self.raw.copy_(x_gates.permute(1, 3, 0, 2, 4))
        self.cn = torch.empty(T + 1, H, B, 2, d, **kw)
        self.m, self.y = torch.empty(T + 1, H, B, d, **kw), torch.empty(T + 1, H, B, d, **kw)
        for buffer, value in zip((self.cn[0, :, :, 0], self.cn[0, :, :, 1], self.m[0], self.y[0]), initial):
            buffer.copy_(_to_head_major(value))
        self.bars = torch.empty(T, H, B, 2, d, **kw)
        self.tanh_z_one = torch.ones(T, H, B, 2, d, **kw)
        self.sig_o = torch.empty(T, H, B, d, **kw)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.raw, self.cn, self.m, self.y, self.bars, self.tanh_z_one, self.sig_o


def _forward_loop(buf: _Buffers, R_fused: torch.Tensor) -> None:
    """Run the recurrence in place over `buf` (see `_Buffers`). R_fused: (H, d, 4d)."""
    raw, cn, m, y = buf.raw, buf.cn, buf.m, buf.y
    T, H, B, G, d = raw.shape
    first = cn[0, :, :, 1] == 0
    check_first = bool(first.any())
    per_step = zip(
        raw.view(T, H, B, G * d).unbind(0), *(g.unbind(0) for g in raw.unbind(3)),
        cn[1:].unbind(0), cn[1:, :, :, 0].unbind(0), cn[1:, :, :, 1].unbind(0), m[1:].unbind(0), y[1:].unbind(0),
        buf.bars.unbind(0), buf.bars[:, :, :, 0].unbind(0), buf.bars[:, :, :, 1].unbind(0),
        buf.bars[:, :, :, 0:1].unbind(0), buf.bars[:, :, :, 1:2].unbind(0),
        buf.tanh_z_one.unbind(0), buf.tanh_z_one[:, :, :, 0].unbind(0), buf.sig_o.unbind(0),
    )  # fmt: skip
    cn_prev, m_prev, y_prev = cn[0], m[0], y[0]
    for t, step in enumerate(per_step):
        raw_t, i, f, z, o, cn_new, c_new, n_new, m_new, y_new = step[:10]
        bars, i_bar, f_bar, i_bar_col, f_bar_col, tanh_z_one, tanh_z, sig_o = step[10:]
        raw_t.baddbmm_(y_prev, R_fused)
        torch.add(F.logsigmoid(f), m_prev, out=f_bar)  # logfm = log fbar before the stabilizer
        torch.maximum(i, f_bar, out=m_new)
        if t == 0 and check_first:
            m_new.copy_(torch.where(first, i, m_new))
            f_bar.masked_fill_(first, float("-inf"))
        torch.sub(i, m_new, out=i_bar)
        f_bar.sub_(m_new)
        bars.exp_()
        torch.tanh(z, out=tanh_z)
        torch.mul(f_bar_col, cn_prev, out=cn_new).addcmul_(i_bar_col, tanh_z_one)
        torch.mul(torch.sigmoid(o, out=sig_o), c_new, out=y_new).div_(n_new)
        cn_prev, m_prev, y_prev = cn_new, m_new, y_new


def _backward_coefficients(raw, cn, m, bars, tanh_z_one, sig_o):
    """Per-step local derivatives, for all steps at once (T, H, B, ...).

    With g = dL/d(c_t, n_t) (total) and g_m = dL/dm_t from later uses of m_t:
        dL/do      = g_y * dy_do
        dL/dz      = g_c * dc_dz
        (dL/di, dL/dlogfm) = sum_{c,n} g * k_signed + g_m * picked
    where, with (A, B) = d(c, n)/d(ibar) * ibar and (C, D) = d(c, n)/d(fbar) * fbar and s = [m_t == i]:
        k = (A, B) - s * ((A, B) + (C, D)),  k_signed = (k, -k)
    (the stabilizer enters through ibar = exp(i - m), fbar = exp(logfm - m): dL/dm_t = g_m - via_i - via_f,
    routed to i when s else to logfm).
    """
    T, H, B, _, d = raw.shape
    i, f = raw[:, :, :, 0], raw[:, :, :, 1]
    c, n = cn[1:, :, :, 0], cn[1:, :, :, 1]
    i_bar, f_bar = bars[:, :, :, 0], bars[:, :, :, 1]
    tanh_z = tanh_z_one[:, :, :, 0]
    new = dict(dtype=raw.dtype, device=raw.device)
    picked = torch.empty(T, H, B, 2, d, **new)
    picked_i = torch.eq(i, m[1:], out=picked[:, :, :, 0])  # m = i (first step, or i >= logfm)
    torch.sub(1, picked_i, out=picked[:, :, :, 1])
    c_over_n = c / n
    dy_dcn = torch.empty(T, H, B, 2, d, **new)
    o_over_n = torch.div(sig_o, n, out=dy_dcn[:, :, :, 0])
    torch.mul(o_over_n, c_over_n, out=dy_dcn[:, :, :, 1]).neg_()
    dy_do = c_over_n.mul_(sig_o).mul_(1 - sig_o)
    dc_dz = torch.mul(tanh_z, tanh_z).neg_().add_(1).mul_(i_bar)
    via_i = bars[:, :, :, 0:1] * tanh_z_one  # (A, B)
    via_f = bars[:, :, :, 1:2] * cn[:-1]  # (C, D)
    k_signed = torch.empty(T, H, B, 2, 2, d, **new)  # (T, H, B, 2 [i, logfm], 2 [c, n], d)
    k = torch.add(via_i, via_f, out=k_signed[:, :, :, 0]).mul_(picked_i.unsqueeze(3)).neg_().add_(via_i)
    torch.neg(k, out=k_signed[:, :, :, 1])
    scale = torch.empty(T, H, B, 2, d, **new)  # (1, dlogfm/df = sigmoid(-f))
    scale[:, :, :, 0] = 1
    torch.neg(f, out=scale[:, :, :, 1]).sigmoid_()
    return dy_dcn, dy_do, dc_dz, k_signed, picked, scale, f_bar.unsqueeze(3)


def _backward_loop(saved, R_fused, grad_y, grad_cn, grad_m):
    """Backward through time. grad_y: (T, H, B, d), the final-state y gradient already added to step T-1;
    grad_cn (H, B, 2, d), grad_m (H, B, d): gradients of the final state. Returns g_raw (T, H, B, 4, d) and the
    initial-state gradients g_cn0 (H, B, 2, d), g_m0 (H, B, d), g_y0 (H, B, d)."""
    raw, cn, m, _, bars, tanh_z_one, sig_o = saved
    T, H, B, G, d = raw.shape
    kw = dict(dtype=raw.dtype, device=raw.device)
    dy_dcn, dy_do, dc_dz, k_signed, picked, scale, f_bar_col = _backward_coefficients(
        raw, cn, m, bars, tanh_z_one, sig_o
    )
    g_raw = torch.empty_like(raw)
    g_raw_flat = g_raw.view(T, H, B, G * d)
    R_fused_t = R_fused.transpose(1, 2)
    g_cn = grad_cn.clone(memory_format=torch.contiguous_format)  # running dL/d(c, n)
    g_c, g_cn_row = g_cn[:, :, 0], g_cn.unsqueeze(2)
    g_y = torch.empty(H, B, d, **kw)
    g_y_col = g_y.unsqueeze(2)
    products = torch.empty(H, B, 2, 2, d, **kw)
    products_c, products_n = products[:, :, :, 0], products[:, :, :, 1]
    g_i_logfm = torch.empty(2, H, B, 2, d, **kw)  # double buffer: step t's dL/dlogfm is dL/dm_{t-1} at step t-1
    g_m_col = grad_m.unsqueeze(2)
    for t in range(T - 1, -1, -1):
        if t == T - 1:
            g_y.copy_(grad_y[t])
        else:
            torch.baddbmm(grad_y[t], g_raw_flat[t + 1], R_fused_t, out=g_y)
        g_cn.addcmul_(g_y_col, dy_dcn[t])  # total dL/d(c_t, n_t)
        torch.mul(g_y, dy_do[t], out=g_raw[t, :, :, 3])
        torch.mul(g_c, dc_dz[t], out=g_raw[t, :, :, 2])
        g_il = g_i_logfm[t % 2]
        torch.mul(g_cn_row, k_signed[t], out=products)
        torch.add(products_c, products_n, out=g_il).addcmul_(g_m_col, picked[t])  # (dL/di, dL/dlogfm)
        torch.mul(g_il, scale[t], out=g_raw[t, :, :, 0:2])
        g_cn.mul_(f_bar_col[t])  # dL/d(c, n)_{t-1}
        g_m_col = g_il[:, :, 1:2]  # dL/dm_{t-1} = dL/dlogfm
    g_y0 = torch.bmm(g_raw_flat[0], R_fused_t)
    return g_raw, (g_cn, g_m_col.squeeze(2), g_y0)


class _SLSTMFunction(torch.autograd.Function):
    """Inputs in the computation dtype: x_gates (B, T, 4, H, d), recurrent_weight (4, H, d, d), c0, n0, m0, y0
    (B, H, d). Outputs: y (B, T, H, d) and the final c, n, m, y (B, H, d)."""

    @staticmethod
    def forward(ctx, x_gates, recurrent_weight, c0, n0, m0, y0):
        T = x_gates.shape[1]
        buf = _Buffers(x_gates, (c0, n0, m0, y0))
        R_fused = _fuse_weight(recurrent_weight)
        _forward_loop(buf, R_fused)
        ctx.save_for_backward(R_fused, *buf.tensors())
        y = buf.y[1:].permute(2, 0, 1, 3).contiguous()
        final = [buf.cn[T, :, :, 0], buf.cn[T, :, :, 1], buf.m[T], buf.y[T]]
        return (y, *(_to_head_major(s).contiguous() for s in final))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_c, grad_n, grad_m, grad_y_last):
        R_fused, *saved = ctx.saved_tensors
        raw, y_all = saved[0], saved[3]
        T, H, B, G, d = raw.shape
        grad_y = grad_y.permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format)  # (T, H, B, d), owned
        grad_y[T - 1].add_(_to_head_major(grad_y_last))
        grad_cn = torch.stack([_to_head_major(grad_c), _to_head_major(grad_n)], dim=2)
        g_raw, (g_cn, g_m, g_y0) = _backward_loop(saved, R_fused, grad_y, grad_cn, _to_head_major(grad_m))
        g_x = g_r = None
        if ctx.needs_input_grad[0]:
            g_x = g_raw.permute(2, 0, 3, 1, 4)  # (B, T, 4, H, d)
        if ctx.needs_input_grad[1]:
            y_prev = y_all[:T].permute(1, 3, 0, 2).reshape(H, d, T * B)
            g_fused = torch.bmm(y_prev, g_raw.transpose(0, 1).reshape(H, T * B, G * d))  # (H, d, 4d)
            g_r = g_fused.view(H, d, G, d).permute(2, 0, 1, 3)
        g_states = [_to_head_major(g) for g in (g_cn[:, :, 0], g_cn[:, :, 1], g_m, g_y0)]
        return (g_x, g_r, *g_states)


def slstm_fused(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState):
    """Fast path with the hand-written backward. Shapes as `slstm_reference`; inputs in the computation dtype."""
    y, c, n, m, y_last = _SLSTMFunction.apply(x_gates, recurrent_weight, *state)
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
