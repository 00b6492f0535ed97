"""GMM attention, location-relative (paper L198, "Location-Relative Attention Mechanisms For Robust Long-Form
Speech Synthesis"; Graves-style mixture with the paper's V2 parameterization).

A seq2seq cross-attention with no query-key comparison: decoder step ``i`` predicts, per head, ``K`` mixture
components from its query vector and moves their means forward over the memory positions ``j = 0 .. S-1``:

    w_i = softmax(q_i[0:K]),  delta_i = softplus(q_i[K:2K]),  sigma_i = softplus(q_i[2K:3K])
    mu_i = mu_{i-1} + delta_i            (mu_{-1} = 0: the alignment starts at the first memory position)
    alpha_i(j) = sum_c w_ic N(j; mu_ic, sigma_ic^2)        out_i = sum_j alpha_i(j) v_j

Because ``delta >= 0`` the alignment only moves forward (monotonic, location-relative), which is what makes it
generalize to long utterances. The component parameters are the first ``3K`` coordinates of the query (a layer's
query projection produces them; ``head_dim >= 3K``); keys are not read (their shape is checked only).
Normalized Gaussian densities: ``sum_j alpha_i(j)`` is about 1 for components well inside the memory, less near
its ends (no renormalization, as in the paper). Cost ``O(Tq S K)``; the means are a cumulative sum, so the whole
sequence is one vectorized pass.

Decoding: memory ``k, v`` is the fixed encoder output; pass ``state=OpState()`` and the means carry over between
calls (``state["mu"]``), so step-by-step equals the full forward. A free mask (memory padding) zeroes weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ._scored import check_free_mask, repeat_kv


def _check(q: Tensor, k: Tensor, mask: Tensor | None, mixtures: int) -> None:
    check_free_mask("gmm_attn", mask, q, k)
    positive_int("mixtures", mixtures)
    if q.shape[-1] < 3 * mixtures:
        raise ValueError(f"gmm_attn: head_dim {q.shape[-1]} < 3 * mixtures = {3 * mixtures} "
                         "(the query holds each component's weight, step and width)")


def _start(state: dict | None, q: Tensor, mixtures: int) -> Tensor:
    if state is not None and "mu" in state:
        mu = state["mu"]
        if mu.shape != (q.shape[0], q.shape[1], mixtures):
            raise ValueError(f"gmm_attn: state holds means of shape {tuple(mu.shape)}, expected "
                             f"{(q.shape[0], q.shape[1], mixtures)}")
        return mu.to(q.dtype)
    return q.new_zeros(q.shape[0], q.shape[1], mixtures)


def _gmm_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   mixtures: int = 2) -> Tensor:
    """Float64, step by step from the formula: a running mean per component, the density written out."""
    _check(q, k, mask, mixtures)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    q, v = q.double(), repeat_kv(v.double(), H)
    K = mixtures
    j = torch.arange(S, dtype=torch.float64)
    mu = torch.zeros(B, H, K, dtype=torch.float64)
    rows = []
    for i in range(Tq):
        p = q[:, :, i]
        w = torch.exp(p[..., :K]) / torch.exp(p[..., :K]).sum(-1, keepdim=True)
        delta = torch.log1p(torch.exp(p[..., K:2 * K]))
        sigma = torch.log1p(torch.exp(p[..., 2 * K:3 * K]))
        mu = mu + delta
        alpha = torch.zeros(B, H, S, dtype=torch.float64)
        for c in range(K):
            s, m = sigma[..., c : c + 1], mu[..., c : c + 1]
            dens = torch.exp(-((j - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi))
            alpha = alpha + w[..., c : c + 1] * dens
        if mask is not None:
            alpha = alpha * mask[:, :, i].double()
        rows.append(alpha)
    return torch.stack(rows, 2) @ v


def gmm_alignment(q: Tensor, S: int, *, mixtures: int = 2, mu0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The alignment ``alpha`` (B, H, Tq, S) of queries (B, H, Tq, >= 3K) over ``S`` memory positions, and the
    last means (B, H, K). ``mu0``: the means before the first query (zeros)."""
    K = mixtures
    w = q[..., :K].softmax(-1)
    delta = F.softplus(q[..., K:2 * K])
    sigma = F.softplus(q[..., 2 * K:3 * K])
    mu = torch.cumsum(delta, dim=2) + (0 if mu0 is None else mu0.unsqueeze(2))  # (B, H, Tq, K)
    j = torch.arange(S, device=q.device, dtype=q.dtype)
    z = (j - mu.unsqueeze(-1)) / sigma.unsqueeze(-1)  # (B, H, Tq, K, S)
    dens = torch.exp(-0.5 * z * z) / (sigma.unsqueeze(-1) * math.sqrt(2 * math.pi))
    return (w.unsqueeze(-2) @ dens).squeeze(-2), mu[:, :, -1]


@register_op("gmm_attn", family="dense", papers=("L198",), decodes=False,
             summary="GMM location-relative cross-attention: K Gaussians per head whose means only move forward "
             "(softplus steps from the query); no query-key scores; O(Tq S K)",
             options={"mixtures": 2}, reference=_gmm_reference, example={"mixtures": 2})
def gmm_attn_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                state: dict | None = None, mixtures: int = 2) -> Tensor | tuple[Tensor, dict]:
    """Decoder queries q (B, H, Tq, D >= 3K) over the memory k, v (B, Hkv, S, D) -> (B, H, Tq, Dv). ``scale`` and
    ``q_offset`` are unused (location only; ``state`` carries the means)."""
    _check(q, k, mask, mixtures)
    alpha, last = gmm_alignment(q, k.shape[2], mixtures=mixtures, mu0=_start(state, q, mixtures))
    if mask is not None:
        alpha = alpha * mask.to(alpha.dtype)
    out = alpha @ repeat_kv(v, q.shape[1])
    if state is None:
        return out
    state["mu"] = last
    return out, state


__all__ = ["gmm_alignment", "gmm_attn_op"]
