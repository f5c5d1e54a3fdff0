"""The mLSTM layer's input maps in channel-major layout, (features, B T), beside their token-major references.

On CPU the layer keeps x_m, conv_act, q, k, v and the gates channel-major (docs/kernels.md, "CPU train step"): a
block-diagonal ("headwise") map is then one batch of (bs, bs) @ (bs, B T) products with long rows, and the gates
[igate; fgate] @ cat(q, k, v) are computed from conv_act and x_m through the gate weights composed with the headwise
maps, so cat(q, k, v) (and its gradient) is never built. Differentiable by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["compose_after_headwise", "gates_from_inputs", "gates_reference", "heads_channel_major",
           "headwise_linear", "headwise_linear_reference"]


def headwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Block-diagonal map in feature-major layout: x (..., dim, N), weight (num_blocks, bs, bs) with out = weight[b] @
    in for block b, bias (dim,) or None -> (..., dim, N)."""
    y = (weight @ x.unflatten(-2, (weight.shape[0], weight.shape[1]))).flatten(-3, -2)
    return y if bias is None else y + bias[:, None]


def headwise_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same map token-major, by one einsum: x (..., dim) -> (..., dim)."""
    y = torch.einsum("boi,...bi->...bo", weight, x.unflatten(-1, (weight.shape[0], weight.shape[1]))).flatten(-2)
    return y if bias is None else y + bias


def compose_after_headwise(weight: torch.Tensor, headwise_weight: torch.Tensor,
                           headwise_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear map `weight` (G, dim) applied after a headwise map, as one map of its input:
    weight @ (W x + b) = (weight @ W) x + weight @ b. Returns ((G, dim), (G,) or None)."""
    num_blocks, block_size = headwise_weight.shape[:2]
    blocks = weight.unflatten(-1, (num_blocks, block_size))  # (G, num_blocks, bs)
    composed = torch.einsum("gbo,boi->gbi", blocks, headwise_weight.to(weight.dtype)).flatten(-2)
    return composed, None if headwise_bias is None else weight @ headwise_bias.to(weight.dtype)


def gates_from_inputs(gate_weight: torch.Tensor, gate_bias: torch.Tensor, q_map, k_map, v_map,
                      conv_cm: torch.Tensor, x_m_cm: torch.Tensor) -> torch.Tensor:
    """[igate; fgate] @ cat(q, k, v) + bias without building cat(q, k, v), with q = q_map(conv_act),
    k = k_map(conv_act), v = v_map(x_m) headwise maps given as (weight, bias or None) pairs.

    gate_weight (2H, 3 inner), gate_bias (2H,), conv_cm and x_m_cm (inner, B T) -> (2H, B T) in gate_weight's dtype.
    """
    inner = conv_cm.shape[0]
    w_q, w_k, w_v = gate_weight.split(inner, dim=1)
    (from_q, bias_q), (from_k, bias_k), (from_v, bias_v) = (
        compose_after_headwise(w, *pair) for w, pair in ((w_q, q_map), (w_k, k_map), (w_v, v_map)))
    for extra in (bias_q, bias_k, bias_v):
        if extra is not None:
            gate_bias = gate_bias + extra
    gates = torch.addmm(gate_bias[:, None], from_q + from_k, conv_cm.to(gate_weight.dtype))
    return torch.addmm(gates, from_v, x_m_cm.to(gate_weight.dtype))


def gates_reference(gate_weight: torch.Tensor, gate_bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> torch.Tensor:
    """The gates the plain way: linear(cat(q, k, v)); q, k, v (..., inner) -> (..., 2H)."""
    return F.linear(torch.cat([q, k, v], dim=-1), gate_weight, gate_bias)


def heads_channel_major(t: torch.Tensor, num_heads: int, B: int, T: int) -> torch.Tensor:
    """(inner, B T) -> (B, H, T, head_dim) as a view (chunk-major in contiguous runs; the mLSTM op copies it)."""
    return t.view(num_heads, t.shape[0] // num_heads, B, T).permute(2, 0, 3, 1)
