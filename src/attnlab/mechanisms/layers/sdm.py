"""Sparse Distributed Memory read as attention, and the softmax-beta fit (paper R172, "Attention Approximates
Sparse Distributed Memory").

Kanerva's SDM stores a pattern at every hard location (neuron) within Hamming distance ``d`` (``radius``) of its
``n``-bit address and reads a query ``xi`` by summing the neurons within ``d`` of ``xi``. With neurons at every
point of ``{0,1}^n`` (the expectation for uniformly random neurons, up to the factor ``r / 2^n``) pattern ``j``
contributes in proportion to the *circle intersection*

    I(dv) = |{x : H(x, xi) <= d and H(x, k_j) <= d}| = sum_{t, u : t + u <= d, dv - t + u <= d} C(dv, t) C(n - dv, u)

with ``dv = H(xi, k_j)`` (``t`` of the ``dv`` differing bits taken from ``k_j``, ``u`` of the agreeing bits flipped).
The read is ``out = sum_j I(dv_j) v_j / sum_j I(dv_j)`` (zero when no pattern is within ``2d``).

``I`` decays about exponentially in ``dv``: ``fit_beta`` fits ``log I(dv) = c - beta dv`` by least squares over
the distances where ``I > 0`` (``dv = 0 .. 2d``; our convention). For bipolar vectors ``x . y = n - 2 dv``, so the
read is about ``softmax(beta / 2 * xi . K) V``: softmax attention with scale ``beta / 2``
(``beta * n / 2`` for unit-norm vectors).

Op ``sdm``: the read with addresses ``sign(q)``, ``sign(k)`` (bit 1 where the coordinate is >= 0) and
``n = head_dim``; the addresses are binary, so gradients reach only ``v``. ``radius=None`` takes ``n // 4``
(a convention, not the paper's optimal radii).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from attnlab.ops.registry import register_op

from ...core.checks import nonneg_int, positive_int
from ._scored import check_free_mask, dense_allowed, repeat_kv


@lru_cache(maxsize=256)
def _intersection_table(n: int, radius: int) -> tuple[int, ...]:
    out = []
    for dv in range(n + 1):
        total = 0
        for t in range(dv + 1):
            for u in range(n - dv + 1):
                if t + u <= radius and dv - t + u <= radius:
                    total += math.comb(dv, t) * math.comb(n - dv, u)
        out.append(total)
    return tuple(out)


def circle_intersection(n: int, radius: int) -> Tensor:
    """``I(dv)`` for ``dv = 0..n``: (n + 1,) float64 counts of points of ``{0,1}^n`` within ``radius`` of two
    addresses ``dv`` apart (exact integers; float64 is exact up to 2^53)."""
    positive_int("n", n)
    nonneg_int("radius", radius)
    if radius > n:
        raise ValueError(f"radius must be <= n = {n}, got {radius}")
    return torch.tensor(_intersection_table(n, radius), dtype=torch.float64)


def fit_beta(n: int, radius: int) -> tuple[float, float]:
    """Least-squares fit of ``log I(dv) = c - beta * dv`` over ``dv`` with ``I(dv) > 0``; returns ``(beta, r2)``
    (``r2``: the coefficient of determination of the log-linear fit)."""
    table = circle_intersection(n, radius)
    dv = torch.nonzero(table > 0).flatten().double()
    if dv.numel() < 2:
        raise ValueError(f"radius {radius} gives fewer than two non-zero intersections; nothing to fit")
    y = table[dv.long()].log()
    x = dv - dv.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    resid = y - (y.mean() + slope * x)
    r2 = 1.0 - float((resid**2).sum() / ((y - y.mean()) ** 2).sum())
    return -slope, r2


def _radius(n: int, radius: int | None) -> int:
    r = n // 4 if radius is None else radius
    nonneg_int("radius", r)
    if r > n:
        raise ValueError(f"radius must be <= head_dim = {n}, got {r}")
    return r


def _sdm_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   radius: int | None = None, causal: bool = True) -> Tensor:
    """Float64, by enumeration: every point of ``{0,1}^n`` is a neuron; a pattern's weight is the number of neurons
    within ``radius`` of both the query and the pattern address (head_dim <= 12)."""
    n = q.shape[-1]
    if n > 12:
        raise ValueError(f"the enumeration reference handles head_dim <= 12, got {n}")
    r = _radius(n, radius)
    H = q.shape[1]
    bits = lambda t: (t.double() >= 0).double()  # noqa: E731
    qb, kb, v = bits(q), bits(repeat_kv(k, H)), repeat_kv(v.double(), H)
    codes = torch.arange(2**n)
    neurons = ((codes[:, None] >> torch.arange(n)) & 1).double()  # (2^n, n)
    near_q = (torch.cdist(qb, neurons.expand(*qb.shape[:2], -1, -1), p=1) <= r + 0.5).double()  # (B, H, Tq, 2^n)
    near_k = (torch.cdist(kb, neurons.expand(*kb.shape[:2], -1, -1), p=1) <= r + 0.5).double()
    w = near_q @ near_k.transpose(-1, -2)  # shared neurons per (query, pattern)
    w = w * dense_allowed(q.shape[2], k.shape[2], q_offset, causal, mask, q.device).double()
    tot = w.sum(-1, keepdim=True)
    return (w @ v) / torch.where(tot > 0, tot, torch.ones_like(tot))


@register_op("sdm", family="dense", papers=("R172",),
             summary="Sparse Distributed Memory read: sign(q), sign(k) as n-bit addresses, weights = Hamming-ball "
             "intersections, normalized; about softmax with scale beta / 2 (fit_beta)",
             options={"radius": None, "causal": True}, reference=_sdm_reference, example={"radius": 2})
def sdm_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
           state: dict | None = None, radius: int | None = None, causal: bool = True) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, n) at positions q_offset.. over k, v (B, Hkv, Tk, n) -> (B, H, Tq, Dv); ``scale`` is unused
    (the weights depend on Hamming distances only). Stateless."""
    check_free_mask("sdm", mask, q, k)
    n, H = q.shape[-1], q.shape[1]
    table = circle_intersection(n, _radius(n, radius)).to(device=q.device, dtype=v.dtype)
    sq = torch.where(q >= 0, 1.0, -1.0).to(v.dtype)
    sk = torch.where(repeat_kv(k, H) >= 0, 1.0, -1.0).to(v.dtype)
    dv = ((n - sq @ sk.transpose(-1, -2)) / 2).round().long()  # Hamming distances, exact integers
    w = table[dv]
    allowed = dense_allowed(q.shape[2], k.shape[2], q_offset, causal, mask, q.device)
    w = w.masked_fill(~allowed, 0.0)
    tot = w.sum(-1, keepdim=True)
    out = (w @ repeat_kv(v, H)) / torch.where(tot > 0, tot, torch.ones_like(tot))
    return out if state is None else (out, state)


__all__ = ["circle_intersection", "fit_beta", "sdm_op"]
