"""Dynamic Convolution Attention (DCA, paper L198, "Location-Relative Attention Mechanisms For Robust Long-Form
Speech Synthesis").

An additive-energy, location-relative cross-attention: decoder step ``i`` reads only the previous alignment
``alpha_{i-1}`` over the memory positions ``j``, filtered three ways, and never compares its query with the keys:

    f_i = F * alpha_{i-1}          static filters ``filters`` (H, kf, Lf), centred ('same') convolution
    g_i = G_i * alpha_{i-1}        dynamic filters predicted from the query: ``G_i = q_i[:kg * Lg]`` as (kg, Lg)
    p_i = log(P * alpha_{i-1})     the fixed causal prior: a beta-binomial(Lp - 1, a, b) filter that only moves
                                   the alignment forward (``(P * alpha)(j) = sum_l P[l] alpha(j - l)``), floored
    e_ij = v^T tanh(W [f_ij ; g_ij] + b) + p_ij,    alpha_i = softmax_j(e_i),    out_i = sum_j alpha_ij v_j

``alpha_{-1}`` is one-hot at ``j = 0``. Knobs: ``dynamic`` (kg) and ``dynamic_len`` (Lg, odd; the query holds the
``kg * Lg`` filter taps: a layer's MLP ``V tanh(W s_i + b)`` of the decoder state produces them), ``filters``,
``mix`` (W, (H, kf + kg, A)), ``bias`` (b, (H, A)), ``energy`` (v, (H, A)); parameter-free defaults: no static
filters, ``W`` the identity, ``b = 0``, ``v = 1``. Prior: ``prior_len`` (Lp = 11), ``prior_alpha`` (0.1),
``prior_beta`` (0.9) as in the paper; the log is floored at ``log(1e-6)``.

Sequential over decoder steps (each alignment depends on the previous one), ``O(Tq S (kf Lf + kg Lg + Lp + A))``.
Decoding with a fixed memory: ``state["alpha"]`` carries the last alignment, so step-by-step equals the full
forward. A free mask (memory padding) restricts each softmax (rows with no allowed key give zeros).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ...core.softmax import masked_softmax
from ._scored import check_free_mask, per_head, repeat_kv

FLOOR = 1e-6


def beta_binomial(length: int, a: float, b: float) -> Tensor:
    """The prior filter: P[l] = C(n, l) B(l + a, n - l + b) / B(a, b), n = length - 1 (float64, sums to 1)."""
    positive_int("prior_len", length)
    for name, x in (("prior_alpha", a), ("prior_beta", b)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0:
            raise ValueError(f"{name} must be a positive number, got {x!r}")
    n = length - 1
    lbeta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    return torch.tensor([math.comb(n, m) * math.exp(lbeta(m + a, n - m + b) - lbeta(a, b)) for m in range(length)],
                        dtype=torch.float64)


def _params(q: Tensor, mask, dynamic, dynamic_len, filters, mix, bias, energy):
    H, D = q.shape[1], q.shape[-1]
    positive_int("dynamic", dynamic)
    positive_int("dynamic_len", dynamic_len)
    if dynamic_len % 2 == 0:
        raise ValueError(f"dynamic_len must be odd (a centred filter), got {dynamic_len}")
    if dynamic * dynamic_len > D:
        raise ValueError(f"dca: head_dim {D} < dynamic * dynamic_len = {dynamic * dynamic_len} (the query holds the "
                         "dynamic filter taps)")
    if filters is not None and (not isinstance(filters, Tensor) or filters.dim() != 3 or filters.shape[0] != H
                                or filters.shape[2] % 2 == 0):
        got = tuple(filters.shape) if isinstance(filters, Tensor) else repr(filters)
        raise ValueError(f"filters must be a tensor (H={H}, kf, odd Lf), got {got}")
    kf = 0 if filters is None else filters.shape[1]
    n_in = kf + dynamic
    A = n_in if mix is None else (mix.shape[-1] if isinstance(mix, Tensor) else -1)
    mix = per_head("mix", mix, (H, n_in, A), q)
    bias = per_head("bias", bias, (H, A), q)
    energy = per_head("energy", energy, (H, A), q)
    return (None if filters is None else filters.to(q.dtype)), mix, bias, energy


def _start(state, q: Tensor, S: int) -> Tensor:
    if state is not None and "alpha" in state:
        a = state["alpha"]
        if a.shape != (q.shape[0], q.shape[1], S):
            raise ValueError(f"dca: state holds an alignment of shape {tuple(a.shape)}, expected "
                             f"{(q.shape[0], q.shape[1], S)}")
        return a.to(q.dtype)
    a = q.new_zeros(q.shape[0], q.shape[1], S)
    a[..., 0] = 1.0
    return a


def _dca_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   dynamic: int = 8, dynamic_len: int = 21, filters: Tensor | None = None, mix: Tensor | None = None,
                   bias: Tensor | None = None, energy: Tensor | None = None, prior_len: int = 11,
                   prior_alpha: float = 0.1, prior_beta: float = 0.9) -> Tensor:
    """Float64, step by step: each filter response as an explicit sum over taps of shifted alignments."""
    check_free_mask("dca", mask, q, k)
    filters, mix, bias, energy = _params(q, mask, dynamic, dynamic_len, filters, mix, bias, energy)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    q, v = q.double(), repeat_kv(v.double(), H)
    P = beta_binomial(prior_len, prior_alpha, prior_beta)

    def shifted(a: Tensor, s: int) -> Tensor:  # out[j] = a[j - s], zero outside
        out = torch.zeros_like(a)
        if abs(s) >= S:
            return out
        if s >= 0:
            out[..., s:] = a[..., : S - s]
        else:
            out[..., : S + s] = a[..., -s:]
        return out

    def centred(a: Tensor, taps: Tensor) -> Tensor:  # taps (B|1, H, L): sum_l taps[l] a[j - (l - c)]
        c = taps.shape[-1] // 2
        return sum(taps[..., l : l + 1] * shifted(a, l - c) for l in range(taps.shape[-1]))

    alpha = torch.zeros(B, H, S, dtype=torch.float64)
    alpha[..., 0] = 1.0
    rows = []
    for i in range(Tq):
        feats = []
        if filters is not None:
            for f in range(filters.shape[1]):
                feats.append(centred(alpha, filters[:, f].double().unsqueeze(0)))
        G = q[:, :, i, : dynamic * dynamic_len].reshape(B, H, dynamic, dynamic_len)
        for g in range(dynamic):
            feats.append(centred(alpha, G[:, :, g]))
        x = torch.stack(feats, -1)  # (B, H, S, kf + kg)
        if mix is not None:
            x = torch.einsum("bhsn,hna->bhsa", x, mix.double())
        if bias is not None:
            x = x + bias.double()[None, :, None]
        t = torch.tanh(x)
        e = (t * energy.double()[None, :, None]).sum(-1) if energy is not None else t.sum(-1)
        prior = sum(P[l] * shifted(alpha, l) for l in range(prior_len))
        e = e + torch.log(torch.clamp(prior, min=FLOOR))
        if mask is not None:
            e = e.masked_fill(~mask[:, :, i], float("-inf"))
        finite = torch.isfinite(e).any(-1, keepdim=True)
        alpha = torch.where(finite, torch.softmax(e, -1), torch.zeros_like(e)).nan_to_num(0.0)
        rows.append(alpha)
    return torch.stack(rows, 2) @ v


def _conv_same(a: Tensor, taps: Tensor) -> Tensor:
    """Per (batch, head) centred convolution: a (B, H, S), taps (B|1, H, n, L) -> (B, H, S, n)."""
    B, H, S = a.shape
    n, L = taps.shape[-2], taps.shape[-1]
    w = taps.expand(B, H, n, L).flip(-1).reshape(B * H * n, 1, L)  # conv1d correlates: flip for a convolution
    x = a.reshape(1, B * H, S).repeat_interleave(n, 1)
    return F.conv1d(x, w, padding=L // 2, groups=B * H * n).view(B, H, n, S).transpose(-1, -2)


@register_op("dca", family="dense", papers=("L198",), decodes=False,
             summary="Dynamic Convolution Attention: energies from static + query-predicted filters of the previous "
             "alignment and a causal beta-binomial prior; location-relative, monotone-leaning cross-attention",
             options={"dynamic": 8, "dynamic_len": 21, "filters": None, "mix": None, "bias": None, "energy": None,
                      "prior_len": 11, "prior_alpha": 0.1, "prior_beta": 0.9},
             reference=_dca_reference, example={"dynamic": 2, "dynamic_len": 3})
def dca_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
           state: dict | None = None, dynamic: int = 8, dynamic_len: int = 21, filters: Tensor | None = None,
           mix: Tensor | None = None, bias: Tensor | None = None, energy: Tensor | None = None, prior_len: int = 11,
           prior_alpha: float = 0.1, prior_beta: float = 0.9) -> Tensor | tuple[Tensor, dict]:
    """Decoder queries q (B, H, Tq, D >= kg * Lg) over the memory k, v (B, Hkv, S, D) -> (B, H, Tq, Dv); ``scale``
    and ``q_offset`` unused (``state`` carries the alignment)."""
    check_free_mask("dca", mask, q, k)
    filters, mix, bias, energy = _params(q, mask, dynamic, dynamic_len, filters, mix, bias, energy)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    P = beta_binomial(prior_len, prior_alpha, prior_beta).to(device=q.device, dtype=q.dtype)
    prior_w = P.flip(0).view(1, 1, -1)  # causal: (P * a)(j) = sum_l P[l] a[j - l]
    alpha = _start(state, q, S)
    G = q[..., : dynamic * dynamic_len].reshape(B, H, Tq, dynamic, dynamic_len)
    rows = []
    for i in range(Tq):
        feats = _conv_same(alpha, G[:, :, i])
        if filters is not None:
            feats = torch.cat([_conv_same(alpha, filters.unsqueeze(0)), feats], dim=-1)
        x = feats if mix is None else torch.einsum("bhsn,hna->bhsa", feats, mix)
        if bias is not None:
            x = x + bias[None, :, None]
        t = torch.tanh(x)
        e = t.sum(-1) if energy is None else (t * energy[None, :, None]).sum(-1)
        prior = F.conv1d(F.pad(alpha.reshape(B * H, 1, S), (prior_len - 1, 0)), prior_w).view(B, H, S)
        e = e + torch.log(torch.clamp(prior, min=FLOOR))
        alpha = masked_softmax(e, None if mask is None else mask[:, :, i])
        rows.append(alpha)
    out = torch.stack(rows, 2) @ repeat_kv(v, H)
    if state is None:
        return out
    state["alpha"] = alpha
    return out, state


__all__ = ["beta_binomial", "dca_op"]
