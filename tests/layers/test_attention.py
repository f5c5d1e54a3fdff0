"""Attention: SDPA helpers vs a naive softmax in float64, RoPE, GQA, KV-cache continuation, init."""

from __future__ import annotations

import math

import pytest
import torch

from revival.layers.attention import Attention
from revival.layers.linear import FUSE_MIN_ROWS
from revival.ops.attention import append_kv, apply_rope, causal_attention, causal_mask, rope_cos_sin

DT = torch.float64


def naive_attention(q, k, v, offset):
    """Softmax attention with an explicit loop-built mask: query i (position offset + i) sees keys j <= offset + i."""
    B, Hq, Tq, hd = q.shape
    group = Hq // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.zeros(Tq, k.shape[2], dtype=torch.bool)
    for i in range(Tq):
        for j in range(k.shape[2]):
            mask[i, j] = j <= offset + i
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def naive_rope(x, positions, theta):
    """RoPE written per pair (d, d + hd/2) with explicit angles."""
    hd = x.shape[-1]
    half = hd // 2
    out = x.clone()
    for t, pos in enumerate(positions.tolist()):
        for d in range(half):
            angle = pos / theta ** (2 * d / hd)
            a, b = x[..., t, d], x[..., t, d + half]
            out[..., t, d] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, d + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


@pytest.mark.parametrize("Tq,Tk", [(7, 7), (1, 9), (4, 11), (3, 3)])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (6, 1)])
def test_causal_attention_matches_naive(Tq, Tk, Hq, Hkv):
    g = torch.Generator().manual_seed(Tq * 100 + Tk * 10 + Hkv)
    q = torch.randn(2, Hq, Tq, 8, generator=g, dtype=DT)
    k = torch.randn(2, Hkv, Tk, 8, generator=g, dtype=DT)
    v = torch.randn(2, Hkv, Tk, 8, generator=g, dtype=DT)
    out = causal_attention(q, k, v)
    ref = naive_attention(q, k, v, offset=Tk - Tq)
    assert out.dtype == DT
    assert torch.allclose(out, ref, atol=1e-12, rtol=1e-10)


def test_causal_mask_offset():
    mask = causal_mask(2, 5)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    with pytest.raises(ValueError, match="num_keys"):
        causal_mask(3, 2)


def test_rope_matches_per_pair_rotation_and_preserves_norm():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 8, generator=g, dtype=DT)
    positions = torch.arange(3, 8)
    cos, sin = rope_cos_sin(positions, 8, theta=500.0, dtype=DT)
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out, naive_rope(x, positions, 500.0), atol=1e-12)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    # relative-position property: <rope(q, p), rope(k, s)> depends only on p - s
    c1, s1 = rope_cos_sin(torch.tensor([10, 4]), 8, dtype=DT)
    c2, s2 = rope_cos_sin(torch.tensor([16, 10]), 8, dtype=DT)
    a, b = apply_rope(x[0, 0, :2], c1, s1), apply_rope(x[0, 0, :2], c2, s2)
    assert torch.allclose(a[0] @ a[1], b[0] @ b[1], atol=1e-12)
    with pytest.raises(ValueError, match="head_dim"):
        rope_cos_sin(positions, 7)


def test_append_kv_validates_and_grows():
    k = torch.zeros(1, 2, 3, 4)
    cache = append_kv(None, k, k)
    cache = append_kv(cache, k[:, :, :1], k[:, :, :1])
    assert cache[0].shape == (1, 2, 4, 4) and cache[1].shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="k_cache"):
        append_kv((torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4)), k, k)


def _layer_reference(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """The layer's math spelled out: projections, naive RoPE, naive masked softmax, output projection."""
    B, T, D = x.shape
    hd = layer.head_dim
    q = layer.q_proj(x).view(B, T, layer.num_heads, hd).transpose(1, 2)
    k = layer.k_proj(x).view(B, T, layer.num_kv_heads, hd).transpose(1, 2)
    v = layer.v_proj(x).view(B, T, layer.num_kv_heads, hd).transpose(1, 2)
    positions = torch.arange(T)
    q, k = naive_rope(q, positions, layer.rope_theta), naive_rope(k, positions, layer.rope_theta)
    y = naive_attention(q, k, v, offset=0)
    return layer.o_proj(y.transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("num_kv_heads", [None, 2, 1])
def test_layer_matches_reference_and_gqa(num_kv_heads):
    torch.manual_seed(0)
    layer = Attention(32, 4, num_kv_heads=num_kv_heads, rope_theta=100.0, bias=True).to(DT)
    x = torch.randn(2, 6, 32, dtype=DT)
    y, (k_cache, v_cache) = layer(x)
    kv = 4 if num_kv_heads is None else num_kv_heads
    assert y.shape == (2, 6, 32)
    assert k_cache.shape == (2, kv, 6, 8) and v_cache.shape == (2, kv, 6, 8)
    assert layer.k_proj.weight.shape == (kv * 8, 32)
    assert torch.allclose(y, _layer_reference(layer, x), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefill_then_steps_equals_one_forward(seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = Attention(24, 6, num_kv_heads=3).to(DT)
    T = 13
    prefill = int(torch.randint(1, T, (1,), generator=g))
    x = torch.randn(3, T, 24, generator=g, dtype=DT)
    y_full, cache_full = layer(x)
    y, state = layer(x[:, :prefill])
    outs = [y]
    for t in range(prefill, T):
        length_before = state[0].shape[2]
        y_t, state = layer(x[:, t : t + 1], state)
        assert state[0].shape[2] == length_before + 1 and state[1].shape[2] == length_before + 1
        outs.append(y_t)
    assert torch.allclose(torch.cat(outs, dim=1), y_full, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(state, cache_full))


@pytest.mark.parametrize("split", [1, 5, 9])
def test_split_chunks_equal_one_forward(split):
    torch.manual_seed(3)
    layer = Attention(16, 2).to(DT)
    x = torch.randn(2, 10, 16, dtype=DT)
    y_full, _ = layer(x)
    y1, state = layer(x[:, :split])
    y2, state = layer(x[:, split:], state)  # a multi-token continuation chunk uses the offset mask
    assert torch.allclose(torch.cat([y1, y2], dim=1), y_full, atol=1e-12)
    assert state[0].shape[2] == 10


def test_training_shape_matches_reference_with_gradients():
    """The shape a task run trains on (B*T >= FUSE_MIN_ROWS: fused q/k/v product, SDPA is_causal, grad enabled): the
    output and the input gradient equal the naive reference's (issue 22: llama's MQAR plateau is not this layer)."""
    torch.manual_seed(5)
    layer = Attention(32, 4, num_kv_heads=2).to(DT)
    x = torch.randn(4, 64, 32, dtype=DT, requires_grad=True)
    assert x.shape[0] * x.shape[1] >= FUSE_MIN_ROWS
    y, _ = layer(x)
    ref = _layer_reference(layer, x)
    assert torch.allclose(y, ref, atol=1e-12)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad((y * g).sum(), x)
    (dx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    assert torch.allclose(dx, dx_ref, atol=1e-12)


def test_gradients_float32_and_init():
    torch.manual_seed(4)
    layer = Attention(32, 4, num_kv_heads=2, bias=True)
    x = torch.randn(2, 7, 32, requires_grad=True)
    y, _ = layer(x)
    assert y.dtype == torch.float32
    (y.square().sum() + y.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    layer.reset_parameters(num_blocks=4)
    assert layer.q_proj.bias.abs().sum() == 0
    assert abs(layer.q_proj.weight.std().item() - math.sqrt(2 / (5 * 32))) < 0.03
    assert abs(layer.o_proj.weight.std().item() - 2 / (4 * math.sqrt(32))) < 0.02


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(32, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="x"):
        Attention(32, 4)(torch.randn(2, 3, 16))


def test_bfloat16_close_to_float32():
    torch.manual_seed(5)
    layer = Attention(32, 4, num_kv_heads=2)
    x = torch.randn(2, 9, 32)
    ref, _ = layer(x)
    y, (k_cache, _) = layer.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16 and k_cache.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 0.03
