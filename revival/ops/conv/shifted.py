"""The causal depthwise conv as K shifted multiply-adds in (B, T, D) layout, with a hand-written backward.

Tap j reads x shifted by K-1-j steps, and its first steps read the carried state. Autograd through the same
multiply-adds revisits each (B, T, D) tensor ~25 times (slice gradients, zero fills, the cat); the hand-written
backward (`CausalConvFunction`) does it in ~13 passes. With document starts, `conv_documents` masks every tap to the
output's document (autograd through the masked multiply-adds). Inputs are validated (`revival.ops.conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_forward(x, state, weight, bias):
    """y (B, T, D) from x (B, T, D), state (B, K-1, D) or None (zeros), weight (D, K), bias (D,) or None."""
    T, K = x.shape[1], weight.shape[1]
    last = weight[:, K - 1]
    y = torch.mul(x, last) if bias is None else torch.addcmul(bias, x, last)
    for j in range(K - 1):
        shift = K - 1 - j  # tap j reads x[t - shift], or state[t + j] for t < shift
        if shift < T:
            y[:, shift:].addcmul_(x[:, : T - shift], weight[:, j])
        if state is not None:
            n = min(shift, T)
            y[:, :n].addcmul_(state[:, j : j + n], weight[:, j])
    return y


class CausalConvFunction(torch.autograd.Function):
    """y (B, T, D) from x (B, T, D), state (B, K-1, D) or None (zeros), weight (D, K), bias (D,) or None; with
    `silu`, SiLU(y) (one node, and the activation's backward runs in x's layout, see below).

    All in x's dtype. The state's zeros are not read when state is None.
    """

    @staticmethod
    def forward(ctx, x, state, weight, bias, silu):
        ctx.has_bias, ctx.has_state, ctx.silu = bias is not None, state is not None, silu
        y = conv_forward(x, state, weight, bias)
        ctx.save_for_backward(x, state, weight, y if silu else None)
        return F.silu(y) if silu else y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, state, weight, pre_activation = ctx.saved_tensors
        T, K = x.shape[1], weight.shape[1]
        # The incoming gradient is often a sum of gradients from consumers in other layouts (a (B, T, D) product, a
        # feature-major projection): one copy into x's layout, then the passes below all run in memory order.
        if grad_y.stride() != x.stride():
            grad_y = torch.empty_like(x).copy_(grad_y)
        if ctx.silu:
            grad_y = torch.ops.aten.silu_backward(grad_y, pre_activation)
        grad_x = torch.mul(grad_y, weight[:, K - 1]) if ctx.needs_input_grad[0] else None
        grad_state = torch.zeros_like(state) if ctx.has_state and ctx.needs_input_grad[1] else None
        need_weight = ctx.needs_input_grad[2]
        grad_weight = torch.empty_like(weight) if need_weight else None
        if need_weight:
            grad_weight[:, K - 1] = (grad_y * x).sum(dim=(0, 1))
        for j in range(K - 1):
            shift = K - 1 - j
            tap = weight[:, j]
            if grad_x is not None and shift < T:
                grad_x[:, : T - shift].addcmul_(grad_y[:, shift:], tap)
            if need_weight:  # sum over (b, t) of grad_y[t] * padded[t + j]
                column = grad_weight[:, j].zero_()
                if shift < T:
                    column += (grad_y[:, shift:] * x[:, : T - shift]).sum(dim=(0, 1))
                if ctx.has_state:
                    n = min(shift, T)
                    column += (grad_y[:, :n] * state[:, j : j + n]).sum(dim=(0, 1))
            if grad_state is not None:
                n = min(shift, T)
                grad_state[:, j : j + n].addcmul_(grad_y[:, :n], tap)
        grad_bias = grad_y.sum(dim=(0, 1)) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_state, grad_weight, grad_bias, None


def conv_documents(x, state, weight, bias, document_starts):
    """`conv_forward` with every tap masked to the output's document (y only; the new state is the caller's)."""
    B, T, D = x.shape
    K = weight.shape[1]
    ids = torch.cumsum(document_starts.long(), dim=1)  # (B, T); 0 is the document the state belongs to
    padded = torch.cat([x.new_zeros(B, K - 1, D) if state is None else state, x], dim=1)
    padded_ids = torch.cat([ids.new_zeros(B, K - 1), ids], dim=1)
    y = x * weight[:, K - 1] if bias is None else torch.addcmul(bias, x, weight[:, K - 1])
    for j in range(K - 1):
        same = (padded_ids[:, j : j + T] == ids)[..., None]
        y = y + padded[:, j : j + T] * same * weight[:, j]
    return y
