"""The sLSTM layer's four headwise gate maps, laid out for the op: gates[g, h] = src_g[..., h, :] @ weight[g, h]^T +
bias[g, h] with src = conv_act for the gates i, f and x for z, o.

`headwise_gates` runs them as bmm's with a hand-written backward (`_HeadwiseGates`), returning the (B, T, 4, H, d)
gates as a view of a (4, H, T, B, d) tensor, the layout the sLSTM op copies fastest; `headwise_gates_reference` is
the same map by one einsum (the float64 reference of the tests).
"""

from __future__ import annotations

import torch

__all__ = ["headwise_gates", "headwise_gates_reference"]


class _HeadwiseGates(torch.autograd.Function):
    """The four headwise gate maps: gates[g, h] = src_g[..., h, :] @ weight[g, h]^T + bias[g, h], with src = conv_act
    for i, f and x for z, o.

    conv_act, x: (B, T, D) with D = H d; weight (4, H, d, d) (out = W @ in per head); bias (4, H, d) or None.
    Returns (B, T, 4, H, d) as a view of a (4, H, T, B, d) tensor: every (gate, head) block is then one contiguous
    (T B, d) matrix, so the maps are plain bmm's over the H heads (reading the sources through a cheap (T, B, D) copy)
    and the sLSTM op copies them into its (T, 4, H, B, d) buffer in 512-float runs. Hand-written backward: two bmm's
    per gate (input and weight gradients), no layout changes beyond the same cheap copies.
    """

    @staticmethod
    def forward(ctx, conv_act, x, weight, bias):
        B, T, D = x.shape
        G, H, d, _ = weight.shape
        sources = [s.transpose(0, 1).contiguous() for s in (conv_act, x)]  # (T, B, D): copies in D-float runs
        heads = [s.view(T * B, H, d).transpose(0, 1) for s in sources]  # (H, T B, d) views
        out = x.new_empty(G, H, T * B, d)
        for g in range(G):
            weight_t = weight[g].transpose(1, 2)
            if bias is None:
                torch.bmm(heads[g // 2], weight_t, out=out[g])
            else:
                torch.baddbmm(bias[g][:, None], heads[g // 2], weight_t, out=out[g])
        ctx.save_for_backward(*sources, weight)
        ctx.has_bias = bias is not None
        return out.view(G, H, T, B, d).permute(3, 2, 0, 1, 4)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_gates):
        conv_t, x_t, weight = ctx.saved_tensors
        T, B, D = x_t.shape
        G, H, d, _ = weight.shape
        grad = grad_gates.permute(2, 3, 1, 0, 4).reshape(G, H, T * B, d)  # the sLSTM op hands back this layout
        heads = [s.view(T * B, H, d).transpose(0, 1) for s in (conv_t, x_t)]
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[2] else None
        grad_sources = [None, None]
        for source in range(2):
            if not ctx.needs_input_grad[source]:
                continue
            first, second = 2 * source, 2 * source + 1  # (i, f) read conv_act, (z, o) read x
            per_head = torch.bmm(grad[first], weight[first]).baddbmm_(grad[second], weight[second])  # (H, T B, d)
            grad_sources[source] = per_head.transpose(0, 1).reshape(T, B, D).transpose(0, 1)
        if grad_weight is not None:
            for g in range(G):
                torch.bmm(grad[g].transpose(1, 2), heads[g // 2], out=grad_weight[g])
        grad_bias = grad.sum(dim=2) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_sources[0], grad_sources[1], grad_weight, grad_bias


def headwise_gates(conv_act: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv_act, x: (B, T, D) with D = H d, one dtype; weight (4, H, d, d) (out = W @ in per head); bias (4, H, d) or
    None. Returns the gate pre-activations (B, T, 4, H, d), gate order (i, f, z, o)."""
    return _HeadwiseGates.apply(conv_act, x, weight, bias)


def headwise_gates_reference(conv_act: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """`headwise_gates` by one einsum (autograd), contiguous."""
    B, T, D = x.shape
    G, H, d, _ = weight.shape
    sources = torch.stack([conv_act, conv_act, x, x], dim=2).view(B, T, G, H, d)
    gates = torch.einsum("btghi,ghoi->btgho", sources, weight)
    return gates if bias is None else gates + bias
