"""Mixture-of-experts feed-forward (Mixtral / Jamba / Qwen3-Next style): top-k routed SwiGLU experts, an optional
shared expert, and the load-balancing loss; a block option of any layer kind (`layer_options[letter]["moe"]`).

    p = softmax(W_router x)                          router probabilities over E experts, in float32 (float64)
    (w, e) = top_k(p)                                token choice, no capacity: every token gets its k experts
    w = w / sum(w)                                   when normalize_top_k (Qwen3; Mixtral's softmax over the top k)
    y = sum_j w_j SwiGLU_{e_j}(x) + sigmoid(W_g x) SwiGLU_shared(x)        (the gate only when shared_gate)
    aux_loss = aux_loss_weight * E * sum_e f_e P_e   f_e: the share of the T k assignments that go to e,
                                                     P_e: the mean router probability of e (Switch Transformer)

`impl="sorted"` sorts the token-expert assignments by expert and runs one matmul per expert on its contiguous rows
(the GPU-friendly path); `impl="loop"` runs every expert on every token and weighs by the dense gate matrix (the
plain reference; tests compare the two in float64). After each forward `aux_loss` holds the weighted loss of that
call (a scalar with gradients); `moe_aux_loss(model)` sums it over a model for the trainer to add.

As a block option (revival/models/blocks.py): `layer_options["M"] = {"moe": {"num_experts": 16, "top_k": 2,
"every": 2, "offset": 1}}` gives the M blocks whose index i (in the whole stack) has i % every == offset a MoE
feed-forward instead of their SwiGLU (a mixer-only kind gets one added, with the kind's pre-norm).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import reject_unknown
from ..ops._common import compute_dtype
from .ffn import SwiGLU, ffn_hidden_dim, small_init_, wang_init_

__all__ = ["MoE", "MoEOptions", "moe_aux_loss"]

IMPLS = ("sorted", "loop")


class MoE(nn.Module):
    """Top-k routed SwiGLU experts plus an optional shared expert (see the module doc). x (..., D) -> (..., D)."""

    def __init__(self, d_model: int, *, num_experts: int, top_k: int, expert_hidden_dim: int,
                 shared_hidden_dim: int = 0, shared_gate: bool = True, normalize_top_k: bool = True,
                 aux_loss_weight: float = 0.01, impl: str = "sorted", bias: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, num_experts={num_experts}], got {top_k!r}")
        if expert_hidden_dim < 1 or shared_hidden_dim < 0:
            raise ValueError(f"expert_hidden_dim, shared_hidden_dim: expected >= 1 and >= 0, got {expert_hidden_dim}, "
                             f"{shared_hidden_dim}")
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight: expected a number >= 0, got {aux_loss_weight!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        self.d_model, self.num_experts, self.top_k, self.hidden_dim = d_model, num_experts, top_k, expert_hidden_dim
        self.normalize_top_k, self.aux_loss_weight, self.impl = normalize_top_k, aux_loss_weight, impl
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, d_model, expert_hidden_dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, d_model, expert_hidden_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, expert_hidden_dim, d_model))
        self.shared = SwiGLU(d_model, shared_hidden_dim, bias=bias) if shared_hidden_dim else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if shared_hidden_dim and shared_gate else None
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self, *, block_index: int = 0, num_blocks: int = 1) -> None:
        """Small init for the router and the up projections, Wang init (depth `num_blocks`) for the down ones."""
        small_init_(self.router.weight, self.d_model)
        small_init_(self.w_gate, self.d_model)
        small_init_(self.w_up, self.d_model)
        wang_init_(self.w_down, self.d_model, num_blocks)
        if self.shared is not None:
            self.shared.reset_parameters(block_index=block_index, num_blocks=num_blocks)
        if self.shared_gate is not None:
            small_init_(self.shared_gate.weight, self.d_model)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (M, D) -> (weights (M, k), experts (M, k) long, aux_loss scalar, weighted); float32 (float64 for
        float64)."""
        probs = torch.softmax(self.router(x).to(compute_dtype(x)), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # the tokens per expert by index_add_, not bincount: a fixed (E,) shape, which torch.compile traces
        assigned = torch.ones(experts.numel(), dtype=probs.dtype, device=probs.device)
        share = probs.new_zeros(self.num_experts).index_add_(0, experts.flatten(), assigned) / experts.numel()
        aux_loss = self.aux_loss_weight * self.num_experts * (share * probs.mean(dim=0)).sum()
        return weights, experts, aux_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected last dim {self.d_model}, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.d_model)
        weights, experts, self.aux_loss = self.route(flat)
        routed = self._sorted(flat, weights, experts) if self.impl == "sorted" else self._loop(flat, weights, experts)
        if self.shared is not None:
            shared = self.shared(flat)
            routed = routed + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(flat)) * shared)
        return routed.reshape(x.shape)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]

    def _sorted(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Assignments sorted by expert: one contiguous block of rows per expert (an empty block still runs, so every
        expert's weights get a gradient, as data-parallel training needs)."""
        order = experts.flatten().argsort(stable=True)
        token = order // self.top_k
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts).tolist()
        rows = x[token]
        out = torch.cat([self._expert(e, block) for e, block in enumerate(rows.split(counts))])
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out)

    def _loop(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, weighed by the dense (M, E) gate (zero outside each token's top k)."""
        gate = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        gate = gate.scatter(1, experts, weights).to(x.dtype)
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            y = y + gate[:, e, None] * self._expert(e, x)
        return y


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the load-balancing losses of the model's MoE layers from their last forward (None: no MoE)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


@dataclass(frozen=True)
class MoEOptions:
    """A block's MoE feed-forward (`layer_options[letter]["moe"]`); None: derived from the model (`build`)."""

    num_experts: int = 8
    top_k: int = 2
    expert_proj_factor: float | None = None  # expert width = ffn_hidden_dim(d_model, this); None: ffn_proj_factor
    shared_proj_factor: float = 0.0  # the shared expert's width likewise; 0: no shared expert
    shared_gate: bool = True  # Qwen's sigmoid gate on the shared expert
    normalize_top_k: bool = True
    aux_loss_weight: float = 0.01
    every: int = 1  # the blocks i with i % every == offset (over the whole stack) get the MoE
    offset: int = 0
    impl: str = "sorted"

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or self.every < 1 or not 0 <= self.offset < self.every:
            raise ValueError(f"moe: expected every >= 1 and 0 <= offset < every, got every={self.every!r}, "
                             f"offset={self.offset!r}")

    @classmethod
    def from_dict(cls, letter: str, options: Any) -> MoEOptions:
        """From `layer_options[letter]["moe"]`; unknown keys are rejected with the valid ones."""
        if not isinstance(options, dict):
            raise ValueError(f"layer_options[{letter!r}]['moe']: expected a dict of MoE options, got {options!r}")
        reject_unknown(options, [f.name for f in dataclasses.fields(cls)], f"layer_options[{letter!r}]['moe']",
                       noun="option")
        return cls(**options)

    def applies_to(self, block_index: int) -> bool:
        return block_index % self.every == self.offset

    def build(self, config: Any) -> MoE:
        """The MoE of a block in a model of `config` (d_model, ffn_proj_factor, ffn_round_up_to_multiple_of,
        use_bias)."""
        factor = config.ffn_proj_factor if self.expert_proj_factor is None else self.expert_proj_factor
        multiple = config.ffn_round_up_to_multiple_of
        shared = ffn_hidden_dim(config.d_model, self.shared_proj_factor, multiple) if self.shared_proj_factor else 0
        return MoE(config.d_model, num_experts=self.num_experts, top_k=self.top_k,
                   expert_hidden_dim=ffn_hidden_dim(config.d_model, factor, multiple), shared_hidden_dim=shared,
                   shared_gate=self.shared_gate, normalize_top_k=self.normalize_top_k,
                   aux_loss_weight=self.aux_loss_weight, impl=self.impl, bias=config.use_bias)
