"""Fast CPU sLSTM: one batched matmul per step for all gates and heads, preallocated buffers, a hand-written backward.

The recurrence cannot be scanned, so each step is made cheap instead. Everything is laid out head-major,
`(H, B, ., d)`, so that the recurrent term of all four gates of all heads is one `baddbmm`:

    raw[t] (H, B, 4d) += y[t-1] (H, B, d) @ R_fused (H, d, 4d),   R_fused[h][:, g*d:(g+1)*d] = R[g, h]

The forward writes pre-activations, c, n, m and y of every step into preallocated buffers (in place). The backward
(`_SLSTMFunction.backward`) is a backward-through-time loop: every quantity that depends only on saved values
(activations, ibar, fbar, ...) is computed for all steps at once before the loop, so a step is one `baddbmm`
(`g_raw[t+1] @ R_fused^T` feeding `g_y[t]`) plus a handful of elementwise ops. The weight gradient is one `bmm`
over all steps after the loop. Same math as `reference.py` (first-step rule, ties pick `i`).

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


def _forward_loop(raw, R_fused, c_all, n_all, m_all, y_all) -> None:
    """In place. raw: (T, H, B, 4, d) holding x; on return the pre-activations. c/n/m/y_all: (T+1, H, B, d), [0] set."""
    T = raw.shape[0]
    first = n_all[0] == 0
    check_first = bool(first.any())
    for t in range(T):
        raw_t = raw[t]
        raw_t.view(raw_t.shape[0], raw_t.shape[1], -1).baddbmm_(y_all[t], R_fused)
        i, f, z, o = raw_t.unbind(2)
        m_new = m_all[t + 1]
        log_f_plus_m = F.logsigmoid(f).add_(m_all[t])
        torch.maximum(i, log_f_plus_m, out=m_new)
        if t == 0 and check_first:
            m_new.copy_(torch.where(first, i, m_new))
            log_f_plus_m.masked_fill_(first, float("-inf"))
        i_bar = torch.sub(i, m_new).exp_()
        f_bar = log_f_plus_m.sub_(m_new).exp_()
        c_new = torch.mul(f_bar, c_all[t], out=c_all[t + 1]).addcmul_(i_bar, torch.tanh(z))
        n_new = torch.addcmul(i_bar, f_bar, n_all[t], out=n_all[t + 1])
        torch.sigmoid(o, out=y_all[t + 1]).mul_(c_new).div_(n_new)


def _backward_loop(raw, R_fused, c_all, n_all, m_all, y_all, grad_y, grad_c, grad_n, grad_m):
    """Backward through time. grad_y: (T, H, B, d) (the final-state y gradient already added to step T-1);
    grad_c/n/m: (H, B, d) gradients of the final state. Returns g_raw (T, H, B, 4, d) and the initial-state
    gradients (g_c0, g_n0, g_m0, g_y0), each (H, B, d)."""
    T, H, B, _, d = raw.shape
    i, f, z, o = raw.unbind(3)
    m, m_prev = m_all[1:], m_all[:-1]
    c, c_prev = c_all[1:], c_all[:-1]
    n, n_prev = n_all[1:], n_all[:-1]

    # everything that depends only on saved values, for all steps at once
    log_f_plus_m = F.logsigmoid(f) + m_prev
    i_bar = torch.exp(i - m)
    f_exponent = log_f_plus_m - m
    f_exponent[0].masked_fill_(n_prev[0] == 0, float("-inf"))
    f_bar = torch.exp(f_exponent)
    picked_i = (i == m).to(raw.dtype)  # m = i (first step, or i >= logfm)
    picked_f = 1 - picked_i
    tanh_z = torch.tanh(z)
    sig_o = torch.sigmoid(o)
    sig_neg_f = torch.sigmoid(-f)
    o_over_n = sig_o / n
    c_over_n = c / n
    k_o = c_over_n * sig_o * (1 - sig_o)  # dy/do
    k_z = i_bar * (1 - tanh_z * tanh_z)  # dc/dz
    tz_ib = tanh_z * i_bar  # dc/d(i via ibar) up to ibar's own derivative
    cp_fb = c_prev * f_bar
    np_fb = n_prev * f_bar

    g_raw = torch.empty_like(raw)
    R_fused_t = R_fused.transpose(1, 2)
    g_c, g_n, g_m = (g.clone(memory_format=torch.contiguous_format) for g in (grad_c, grad_n, grad_m))
    g_y = torch.empty(H, B, d, dtype=raw.dtype, device=raw.device)
    for t in range(T - 1, -1, -1):
        if t == T - 1:
            g_y.copy_(grad_y[t])
        else:
            torch.baddbmm(grad_y[t], g_raw[t + 1].view(H, B, 4 * d), R_fused_t, out=g_y)
        g_i, g_f, g_z, g_o = g_raw[t].unbind(2)
        g_a = g_y * o_over_n[t]
        g_c.add_(g_a)  # total dL/dc_t
        g_n.addcmul_(g_a, c_over_n[t], value=-1)  # total dL/dn_t
        torch.mul(g_y, k_o[t], out=g_o)
        torch.mul(g_c, k_z[t], out=g_z)
        g_via_i = torch.mul(g_c, tz_ib[t]).add_(g_n * i_bar[t])  # dL/d(ibar) * ibar
        g_via_f = torch.mul(g_c, cp_fb[t]).add_(g_n * np_fb[t])  # dL/d(fbar) * fbar
        g_c.mul_(f_bar[t])
        g_n.mul_(f_bar[t])
        g_m.sub_(g_via_i).sub_(g_via_f)  # total dL/dm_t
        torch.addcmul(g_via_i, g_m, picked_i[t], out=g_i)
        g_m.mul_(picked_f[t]).add_(g_via_f)  # dL/d(logfm) = dL/dm_{t-1}
        torch.mul(g_m, sig_neg_f[t], out=g_f)
    g_y0 = torch.bmm(g_raw[0].view(H, B, 4 * d), R_fused_t)
    return g_raw, (g_c, g_n, g_m, g_y0)


class _SLSTMFunction(torch.autograd.Function):
    """Inputs in the computation dtype: x_gates (B, T, 4, H, d), recurrent_weight (4, H, d, d), c0, n0, m0, y0
    (B, H, d). Outputs: y (B, T, H, d) and the final c, n, m, y (B, H, d)."""

    @staticmethod
    def forward(ctx, x_gates, recurrent_weight, c0, n0, m0, y0):
        B, T, G, H, d = x_gates.shape
        kw = dict(dtype=x_gates.dtype, device=x_gates.device)
        raw = torch.empty(T, H, B, G, d, **kw)
        raw.copy_(x_gates.permute(1, 3, 0, 2, 4))
        c_all, n_all, m_all, y_all = (torch.empty(T + 1, H, B, d, **kw) for _ in range(4))
        for buffer, initial in zip((c_all, n_all, m_all, y_all), (c0, n0, m0, y0)):
            buffer[0].copy_(_to_head_major(initial))
        R_fused = _fuse_weight(recurrent_weight)
        _forward_loop(raw, R_fused, c_all, n_all, m_all, y_all)
        ctx.save_for_backward(raw, R_fused, c_all, n_all, m_all, y_all)
        y = y_all[1:].permute(2, 0, 1, 3).contiguous()
        final = [_to_head_major(buffer[T]).contiguous() for buffer in (c_all, n_all, m_all, y_all)]
        return (y, *final)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_c, grad_n, grad_m, grad_y_last):
        raw, R_fused, c_all, n_all, m_all, y_all = ctx.saved_tensors
        T, H, B, G, d = raw.shape
        grad_y = grad_y.permute(1, 2, 0, 3).clone(memory_format=torch.contiguous_format)  # (T, H, B, d), owned
        grad_y[T - 1].add_(_to_head_major(grad_y_last))
        g_raw, initial_grads = _backward_loop(
            raw, R_fused, c_all, n_all, m_all, y_all,
            grad_y, *(_to_head_major(g) for g in (grad_c, grad_n, grad_m)),
        )  # fmt: skip
        g_x = g_r = None
        if ctx.needs_input_grad[0]:
            g_x = g_raw.permute(2, 0, 3, 1, 4)  # (B, T, 4, H, d)
        if ctx.needs_input_grad[1]:
            y_prev = y_all[:T].permute(1, 3, 0, 2).reshape(H, d, T * B)
            g_fused = torch.bmm(y_prev, g_raw.transpose(0, 1).reshape(H, T * B, G * d))  # (H, d, 4d)
            g_r = g_fused.view(H, d, G, d).permute(2, 0, 1, 3)
        g_states = [_to_head_major(g) for g in initial_grads]
        return (g_x, g_r, *g_states)


def slstm_fused(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState):
    """Fast path with the hand-written backward. Shapes as `slstm_reference`; inputs in the computation dtype."""
    y, c, n, m, y_last = _SLSTMFunction.apply(x_gates, recurrent_weight, *state)
    return y, (c, n, m, y_last)


def slstm_fused_autograd(x_gates: torch.Tensor, recurrent_weight: torch.Tensor, state: SLSTMState):
    """The same head-major batched step, written out of place and differentiated by autograd."""
    B, T, G, H, d = x_gates.shape
    R_fused = _fuse_weight(recurrent_weight)
    x = x_gates.permute(1, 3, 0, 2, 4)  # (T, H, B, 4, d)
    c, n, m, y = (_to_head_major(s) for s in state)
    first = n == 0
    outputs = []
    for t in range(T):
        raw = torch.baddbmm(x[t].reshape(H, B, G * d), y, R_fused).view(H, B, G, d)
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
