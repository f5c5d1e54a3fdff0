"""Cells for the Newton solver: h_t = step(h_{t-1}, x_t, *weights), with their Jacobians (docs/math.md).

A `Cell` is a step function vectorised over (B, T) plus its Jacobian structure:

    "diagonal": state (B, T, N),    Jacobian dh_t/dh_{t-1} (B, T, N)
    "block":    state (B, T, G, k), Jacobian (B, T, G, k, k), J[..., g, i, j] = dh_t[g, i] / dh_{t-1}[g, j]

`jacobian(h_prev, x, *weights, diagonal)` returns (step value, J) at every t at once; diagonal=True asks only for
the diagonal of a block Jacobian (shape of the state: what quasi-DEER and ELK use). A cell without an analytic
Jacobian gets one from torch.func (forward mode, `autograd_jacobian`): fine for small dense cells.

Cells here (x holds the input contributions W x_t + b, computed outside by one matmul over the whole sequence):

- PARAGRU (ParaRNN's GRU, Danieli et al. 2025): diagonal state weights a = (a_z, a_r, a_h) (3, N); x (B, T, 3, N)
      z = sigmoid(x_z + a_z h), r = sigmoid(x_r + a_r h), hc = tanh(x_h + a_h (r h)), h' = (1 - z) h + z hc
- PARALSTM (ParaRNN's LSTM: coupled input-forget gate, diagonal peepholes): state [c, h] per unit (B, T, N, 2),
  a = (a_f, a_o, a_c) (3, N), peepholes p = (p_f, p_o) (2, N); x (B, T, 3, N) = (x_f, x_o, x_c)
      f = sigmoid(x_f + a_f h + p_f c), cc = tanh(x_c + a_c h), c' = f c + (1 - f) cc,
      o = sigmoid(x_o + a_o h + p_o c'), h' = o tanh(c')                        -> 2 x 2 block per unit
- SLSTM (xLSTM's sLSTM, memory mixing per head): state [l, u, y] per head (B, T, H, 3d), x (B, T, 4, H, d)
  (gates i, f, z, o), R (4, H, d, d). With l = log of the normaliser (m + log n) and u = c / n the stabiliser
  disappears: l' = logaddexp(logsigmoid(f) + l, i), w = exp(i - l'), u' = u + w (tanh z - u), y' = sigmoid(o) u',
  pre-activations x + y R. Same y as `revival.ops.slstm`; J is a full 3d x 3d block per head. A document starts
  from the empty memory [-inf, 0, 0] (`empty_state`), where the step gives l' = i, u' = tanh z.
- DENSE_GRU / DENSE_LSTM (classic cells, full recurrent matrices, torch.func Jacobian; state (B, T, 1, d) and
  (B, T, 1, 2d) = [c, h]): x (B, T, 3, d) (r, z, n) / (B, T, 4, d) (i, f, g, o); W (3 or 4, d, d) applied as
  h @ W[g]; the GRU also has b_hn (d,) inside the reset product as in torch.nn.GRUCell.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Cell", "DENSE_GRU", "DENSE_LSTM", "PARAGRU", "PARALSTM", "SLSTM", "autograd_jacobian"]


@dataclass(frozen=True)
class Cell:
    """A recurrence h_t = step(h_{t-1}, x_t, *weights) and the structure of its Jacobian (see the module doc)."""

    name: str
    structure: str  # "diagonal" or "block"
    step: Callable[..., torch.Tensor]
    analytic_jacobian: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    # the state a document starts from, shaped like its argument (None: zeros; the sLSTM's empty memory has l = -inf)
    empty_state: Callable[[torch.Tensor], torch.Tensor] | None = None

    def restart(self, h_prev: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """h_prev with the empty state wherever `at` (a bool tensor broadcastable to h_prev) is True."""
        if self.empty_state is None:
            return h_prev.masked_fill(at, 0.0)
        return torch.where(at, self.empty_state(h_prev), h_prev)

    def jacobian(self, h_prev, x, *weights, diagonal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(step(h_prev, x, *weights), dstep/dh_prev) at every (b, t); diagonal=True: the diagonal only."""
        if self.analytic_jacobian is not None:
            return self.analytic_jacobian(h_prev, x, *weights, diagonal=diagonal)
        value, jac = autograd_jacobian(self.step, h_prev, x, *weights)
        return value, (torch.diagonal(jac, dim1=-2, dim2=-1) if diagonal else jac)


def autograd_jacobian(step, h_prev: torch.Tensor, x: torch.Tensor, *weights) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-diagonal Jacobian of a block cell by forward-mode autodiff, one (b, t) at a time under vmap."""
    B, T, G, k = h_prev.shape

    def one(h_one, x_one):
        return step(h_one[None, None], x_one[None, None], *weights)[0, 0]

    def value_and_jac(h_one, x_one):
        jac = torch.func.jacfwd(one)(h_one, x_one)  # (G, k, G, k)
        return one(h_one, x_one), torch.diagonal(jac, dim1=0, dim2=2).permute(2, 0, 1)  # (G, k, k)

    flat_h, flat_x = h_prev.reshape(B * T, G, k), x.reshape(B * T, *x.shape[2:])
    value, jac = torch.func.vmap(value_and_jac)(flat_h, flat_x)
    return value.reshape(B, T, G, k), jac.reshape(B, T, G, k, k)


# ParaGRU ----------------------------------------------------------------------------------------------------------

def _paragru_parts(h, x, a):
    z = torch.sigmoid(x[:, :, 0] + a[0] * h)
    r = torch.sigmoid(x[:, :, 1] + a[1] * h)
    hc = torch.tanh(x[:, :, 2] + a[2] * (r * h))
    return z, r, hc


def paragru_step(h, x, a):
    z, _, hc = _paragru_parts(h, x, a)
    return h + z * (hc - h)


def paragru_jacobian(h, x, a, *, diagonal: bool = False):
    z, r, hc = _paragru_parts(h, x, a)
    dz = z * (1 - z) * a[0]
    dr = r * (1 - r) * a[1]
    dhc = (1 - hc * hc) * a[2] * (r + h * dr)
    return h + z * (hc - h), (1 - z) + dz * (hc - h) + z * dhc


PARAGRU = Cell("paragru", "diagonal", paragru_step, paragru_jacobian)


# ParaLSTM ---------------------------------------------------------------------------------------------------------

def _paralstm_parts(state, x, a, p):
    c, h = state[..., 0], state[..., 1]
    f = torch.sigmoid(x[:, :, 0] + a[0] * h + p[0] * c)
    cc = torch.tanh(x[:, :, 2] + a[2] * h)
    c_new = f * c + (1 - f) * cc
    o = torch.sigmoid(x[:, :, 1] + a[1] * h + p[1] * c_new)
    return c, h, f, cc, c_new, o


def paralstm_step(state, x, a, p):
    *_, c_new, o = _paralstm_parts(state, x, a, p)
    return torch.stack((c_new, o * torch.tanh(c_new)), dim=-1)


def paralstm_jacobian(state, x, a, p, *, diagonal: bool = False):
    c, h, f, cc, c_new, o = _paralstm_parts(state, x, a, p)
    tc = torch.tanh(c_new)
    df = f * (1 - f) * (c - cc)  # dc'/d(f pre-activation)
    dc_dc = f + df * p[0]
    dc_dh = df * a[0] + (1 - f) * (1 - cc * cc) * a[2]
    do = o * (1 - o) * tc  # dh'/d(o pre-activation)
    dh_dcnew = o * (1 - tc * tc) + do * p[1]
    dh_dc = dh_dcnew * dc_dc
    dh_dh = do * a[1] + dh_dcnew * dc_dh
    value = torch.stack((c_new, o * tc), dim=-1)
    if diagonal:
        return value, torch.stack((dc_dc, dh_dh), dim=-1)
    jac = torch.stack((torch.stack((dc_dc, dc_dh), dim=-1), torch.stack((dh_dc, dh_dh), dim=-1)), dim=-2)
    return value, jac


PARALSTM = Cell("paralstm", "block", paralstm_step, paralstm_jacobian)


# sLSTM ------------------------------------------------------------------------------------------------------------

def _slstm_parts(state, x, R):
    d = R.shape[-1]
    log_n, u, y = state[..., :d], state[..., d:2 * d], state[..., 2 * d:]
    raw = x + torch.einsum("bthd,ghde->btghe", y, R)
    i, f, z, o = raw.unbind(dim=2)
    log_n_new = torch.logaddexp(F.logsigmoid(f) + log_n, i)
    w = torch.exp(i - log_n_new)  # input weight; the forget weight is 1 - w
    tz, so = torch.tanh(z), torch.sigmoid(o)
    u_new = u + w * (tz - u)
    return log_n, u, f, tz, so, log_n_new, w, u_new


def slstm_step(state, x, R):
    *_, so, log_n_new, _, u_new = _slstm_parts(state, x, R)
    return torch.cat((log_n_new, u_new, so * u_new), dim=-1)


def slstm_jacobian(state, x, R, *, diagonal: bool = False):
    log_n, u, f, tz, so, log_n_new, w, u_new = _slstm_parts(state, x, R)
    keep = 1 - w
    sf = torch.sigmoid(-f)  # d logsigmoid(f) / df
    gap = (tz - u) * w * keep  # du'/di; du'/dlog_n = -gap, du'/df = -gap sf
    dso = so * (1 - so) * u_new  # dy'/d(o pre-activation)
    value = torch.cat((log_n_new, u_new, so * u_new), dim=-1)
    # d(pre-activation g)/dy_prev = R[g]^T: column j of a row vector e is R[g, h, j, e]
    Ri, Rf, Rz, Ro = (R[g].transpose(-1, -2) for g in range(4))  # (H, e, j)
    if diagonal:
        Rd = torch.diagonal(R, dim1=-2, dim2=-1)  # (4, H, d)
        du_dy = gap * Rd[0] - gap * sf * Rd[1] + w * (1 - tz * tz) * Rd[2]
        return value, torch.cat((keep, keep, so * du_dy + dso * Rd[3]), dim=-1)
    dl_dy = (keep * sf)[..., None] * Rf + w[..., None] * Ri  # (B, T, H, d, d)
    du_dy = (gap[..., None] * Ri - (gap * sf)[..., None] * Rf + (w * (1 - tz * tz))[..., None] * Rz)
    dy_dy = so[..., None] * du_dy + dso[..., None] * Ro
    eye_like = torch.diag_embed
    zeros = torch.zeros_like(dl_dy)
    rows = (
        torch.cat((eye_like(keep), zeros, dl_dy), dim=-1),
        torch.cat((eye_like(-gap), eye_like(keep), du_dy), dim=-1),
        torch.cat((eye_like(-so * gap), eye_like(so * keep), dy_dy), dim=-1),
    )
    return value, torch.cat(rows, dim=-2)


def slstm_empty_state(like: torch.Tensor) -> torch.Tensor:
    """[l, u, y] = [-inf, 0, 0]: no memory (n = 0), what the op's zero state (c, n, m, y) = 0 is."""
    empty = torch.zeros_like(like)
    empty[..., : like.shape[-1] // 3] = float("-inf")
    return empty


SLSTM = Cell("slstm", "block", slstm_step, slstm_jacobian, slstm_empty_state)


# classic dense cells (torch.func Jacobians) ------------------------------------------------------------------------

def dense_gru_step(state, x, W, b_hn):
    h = state[:, :, 0]
    hr, hz, hn = (h @ W[g] for g in range(3))
    r = torch.sigmoid(x[:, :, 0] + hr)
    z = torch.sigmoid(x[:, :, 1] + hz)
    n = torch.tanh(x[:, :, 2] + r * (hn + b_hn))
    return ((1 - z) * n + z * h)[:, :, None]


def dense_lstm_step(state, x, W):
    d = W.shape[-1]
    c, h = state[:, :, 0, :d], state[:, :, 0, d:]
    i, f, g, o = (x[:, :, k] + h @ W[k] for k in range(4))
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.cat((c_new, torch.sigmoid(o) * torch.tanh(c_new)), dim=-1)[:, :, None]


DENSE_GRU = Cell("dense_gru", "block", dense_gru_step)
DENSE_LSTM = Cell("dense_lstm", "block", dense_lstm_step)
