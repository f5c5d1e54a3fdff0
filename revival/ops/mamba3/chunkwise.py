"""Mamba-3 chunkwise in PyTorch (the fast path; the algorithm in `revival.ops.mamba3`'s module doc).

Inputs are validated, the state given whole. Computation in float32 (float64 for float64)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._common import chunk_spans, compute_dtype
from ..ssd.chunkwise import intra_chunk_decay, states_before_chunks
from .reference import rotate


def mamba3_chunkwise(x, dt, A, lam, B, C, theta, D, state, chunk_size: int,
                     document_starts=None) -> tuple[torch.Tensor, tuple]:
    """RoPE on B and C by the cumulative angle, the trapezoid as a rank-2R input, then scalar-decay chunks."""
    T = x.shape[1]
    frame = rotating_frame(x, dt, A, lam, B, C, theta, state, document_starts)
    dt = frame.dt[..., None, None]
    inputs = torch.cat([dt * frame.current_weight[..., None, None] * frame.x,
                        dt * frame.previous_weight[..., None, None] * frame.x_prev], dim=3)  # (n, T, H, 2R, P)
    keys = torch.cat([frame.B_rot, frame.B_prev], dim=3)  # (n, T, H, 2R, N)
    g = frame.g0
    outputs = []
    for start, stop, L in chunk_spans(T, chunk_size):
        starts = None if document_starts is None else document_starts[:, start:stop]
        y, g = _equal_chunks(inputs[:, start:stop], keys[:, start:stop], frame.C_rot[:, start:stop],
                             frame.log_decay[:, start:stop], g, L, starts)
        outputs.append(y)
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    if D is not None:
        y = y + D.to(y.dtype)[:, None, None] * frame.x
    return y, frame.final_state(g)


class RotatingFrame(NamedTuple):
    """Mamba-3's inputs in the state's rotating frame, in the compute dtype (module doc of `revival.ops.mamba3`):
    g_t = exp(log_decay_t) g_{t-1} + dt_t (current_weight_t x_t B_rot_t^T + previous_weight_t x_prev_t B_prev_t^T),
    y_t = g_t C_rot_t; current_weight = lam, previous_weight = (1 - lam) a (0 at a document start)."""

    x: torch.Tensor  # (n, T, H, R, P)
    x_prev: torch.Tensor  # (n, T, H, R, P): x_{t-1}, the state's previous x at t = 0
    dt: torch.Tensor  # (n, T, H)
    log_decay: torch.Tensor  # (n, T, H): dt A
    current_weight: torch.Tensor  # (n, T, H)
    previous_weight: torch.Tensor  # (n, T, H)
    B_rot: torch.Tensor  # (n, T, H, R, N): R(phi_t)^T B_t
    B_prev: torch.Tensor  # (n, T, H, R, N): B_rot_{t-1}, the state's previous B rotated by its angle at t = 0
    C_rot: torch.Tensor  # (n, T, H, R, N)
    angle: torch.Tensor  # (n, T, H, N/2): phi_t
    g0: torch.Tensor  # (n, H, P, N): the memory before the first token
    B_last: torch.Tensor  # (n, H, R, N): B_{T-1} as given (the next call's previous B)

    def final_state(self, g: torch.Tensor) -> tuple:
        """The op's state after the last token, given the memory g at T."""
        return self.angle[:, -1], g, self.B_last, self.x[:, -1]


def rotating_frame(x, dt, A, lam, B, C, theta, state, document_starts) -> RotatingFrame:
    """The angles (restarted at document starts), RoPE on B and C, the previous token's x and B, the trapezoid's
    weights without their dt factor; computation in float32 (float64 for float64)."""
    dtype = compute_dtype(x)
    x, dt, A, lam, B, C, theta = (t.to(dtype) for t in (x, dt, A, lam, B, C, theta))
    angle0, g0, prev_B, prev_x = (t.to(dtype) for t in state)
    angle = _angles(angle0, dt[..., None] * theta, document_starts)  # phi_t, (n, T, H, N/2)
    B_rot = rotate(B, -angle[:, :, :, None, :])  # R(phi_t)^T B_t: the state's rotating frame
    C_rot = rotate(C, -angle[:, :, :, None, :])
    B_prev = torch.cat([rotate(prev_B, -angle0[:, :, None, :])[:, None], B_rot[:, :-1]], dim=1)
    x_prev = torch.cat([prev_x[:, None], x[:, :-1]], dim=1)
    log_decay = dt * A
    return RotatingFrame(x, x_prev, dt, log_decay, lam, previous_weight(log_decay, lam, document_starts), B_rot,
                         B_prev, C_rot, angle, g0, B[:, -1])


def previous_weight(log_decay, lam, document_starts) -> torch.Tensor:
    """The trapezoid's weight of the previous token without its dt factor, (1 - lam) a (0 at a document start)."""
    weight = (1 - lam) * torch.exp(log_decay)
    if document_starts is not None:  # a document's first token has no previous token
        weight = torch.where(document_starts[..., None], 0.0, weight)
    return weight


def _angles(angle0, steps, document_starts) -> torch.Tensor:
    """phi_t = phi_{t-1} + steps_t from angle0, restarting from 0 at each document start: (n, T, H, N/2)."""
    total = torch.cumsum(steps, dim=1)
    if document_starts is None:
        return angle0[:, None] + total
    T = steps.shape[1]
    positions = torch.arange(T, device=steps.device).expand_as(document_starts)
    last_start = torch.cummax(torch.where(document_starts, positions, -1), dim=1).values  # (n, T), -1: none yet
    before = torch.cat([torch.zeros_like(total[:, :1]), total[:, :-1]], dim=1)  # the sum up to t - 1
    at_start = before.gather(1, last_start.clamp_min(0)[..., None, None].expand_as(total))
    base = torch.where((last_start >= 0)[..., None, None], at_start, -angle0[:, None])
    return total - base


def _equal_chunks(inputs, keys, queries, log_decay, S, L: int,
                  document_starts=None) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = exp(log_decay_t) S_{t-1} + sum_k inputs_{t,k} keys_{t,k}^T, y_{t,r} = S_t queries_{t,r}; T = NC * L;
    with document_starts (n, T) S restarts from zero at each start."""
    n, T, H, K, P = inputs.shape
    R, N = queries.shape[3], queries.shape[4]
    NC = T // L
    inputs = inputs.reshape(n, NC, L, H, K, P)
    keys = keys.reshape(n, NC, L, H, K, N)
    queries = queries.reshape(n, NC, L, H, R, N)
    cum = torch.cumsum(log_decay.reshape(n, NC, L, H), dim=2)

    # Intra-chunk: y_t += sum_{s <= t} exp(cum_t - cum_s) sum_k (q_t . keys_{s,k}) inputs_{s,k}.
    decay, masks = intra_chunk_decay(cum, document_starts)
    if masks is not None:
        _, continues, to_end_mask, keeps = masks
    scores = torch.einsum("nclhrk,ncshqk->nclshrq", queries, keys) * decay[..., None, None]
    y = torch.einsum("nclshrq,ncshqp->nclhrp", scores, inputs)

    # Each chunk's own contribution to its end state, and the state before each chunk (sequential over chunks).
    to_end = torch.exp(cum[:, :, -1:, :] - cum)  # (n, NC, L, H)
    from_start = torch.exp(cum)[..., None, None]  # (n, NC, L, H, 1, 1)
    chunk_decay = torch.exp(cum[:, :, -1])
    if document_starts is not None:  # only the chunk's last document reaches its end; a start cuts the state before
        to_end = to_end * to_end_mask[..., None]
        chunk_decay = chunk_decay * keeps[..., None]
        from_start = from_start * continues[..., None, None, None]
    S_local = torch.einsum("nclh,nclhqp,nclhqk->nchpk", to_end, inputs, keys)
    starts, S = states_before_chunks(S, chunk_decay, S_local)
    y = y + torch.einsum("nclhrk,nchpk->nclhrp", queries, starts) * from_start
    return y.reshape(n, T, H, R, P), S
