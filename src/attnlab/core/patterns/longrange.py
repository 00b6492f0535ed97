"""Long-range static patterns: PowerAttention (P277), Radial attention (P69), FIT groups + latents (P4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..checks import positive_int
from .base import Pattern
from .basic import _rows


def _next_pow2_above(x: Tensor) -> Tensor:
    """Smallest power of two strictly greater than ``x >= 0`` (``2 ** bit_length(x)``), int64 bit smearing."""
    x = x.to(torch.int64)
    for s in (1, 2, 4, 8, 16, 32):
        x = x | (x >> s)
    return x + 1


@dataclass(frozen=True)
class PowerAttention(Pattern):
    """PowerAttention (P277): a local window plus keys at power-of-two distances, at block granularity.

    Queries and keys are cut into blocks of ``block`` tokens (``block=1``: token level). Query block
    ``qb`` sees key block ``kb`` when the block distance ``d = qb - kb`` is ``0 <= d < local_blocks`` or a
    power of two (1, 2, 4, ...); causal (default) also requires ``j <= p``. Two-sided when not causal
    (``|d|``). Each layer reaches ``2**i`` blocks back, so ``L`` layers cover ``2**L`` blocks with no gap
    (the paper's complete, exponentially growing receptive field). Keys per query ~
    ``block * (local_blocks + log2(p / block))``.
    """

    block: int = 1
    local_blocks: int = 1
    causal: bool = True

    def __post_init__(self):
        positive_int("block", self.block)
        positive_int("local_blocks", self.local_blocks)

    def mask_mod(self, b, h, q_idx, kv_idx):
        d = q_idx // self.block - kv_idx // self.block
        if not self.causal:
            d = torch.abs(d)
        ok = (d >= 0) & ((d < self.local_blocks) | ((d > 0) & ((d & (d - 1)) == 0)))
        return ok & (kv_idx <= q_idx) if self.causal else ok

    def _distances(self, n: int) -> list[int]:
        pows, x = [], 1
        while x < n:
            pows.append(x)
            x *= 2
        return sorted(set(range(min(self.local_blocks, n))) | set(pows))

    def _dense(self, q_len, kv_len, q_offset):
        m = torch.zeros(q_len, kv_len, dtype=torch.bool)
        nb = -(-max(kv_len, q_offset + q_len) // self.block)
        for i in range(q_len):
            p = q_offset + i
            qb = p // self.block
            for d in self._distances(nb):
                for kb in (qb - d,) if self.causal else {qb - d, qb + d}:
                    if kb >= 0:
                        stop = p + 1 if self.causal else (kb + 1) * self.block
                        m[i, kb * self.block : min((kb + 1) * self.block, stop, kv_len)] = True
        return m

    def count(self, q_len, kv_len, q_offset=0):
        r = _rows(q_len, q_offset)
        qb = torch.floor(r / self.block)
        top = torch.clamp(r, max=kv_len - 1) if self.causal else torch.full_like(r, kv_len - 1)
        nb = -(-max(kv_len, q_offset + q_len) // self.block)
        total = 0.0
        for d in self._distances(nb):
            for sign in (1,) if self.causal or d == 0 else (1, -1):
                kb = qb - sign * d
                lo = torch.clamp(kb * self.block, min=0)
                hi = torch.minimum(kb * self.block + self.block - 1, top)
                total += float(torch.where(kb >= 0, (hi - lo + 1).clamp(min=0), 0).sum())
        return total

    @property
    def is_causal(self) -> bool:
        return self.causal


@dataclass(frozen=True)
class Radial(Pattern):
    """Radial attention (P69): compute density halves each time the (frame) distance doubles.

    Tokens are grouped in frames of ``frame`` tokens (``frame=1``: plain 1-D tokens); a token is
    ``(f, s) = (p // frame, p % frame)``. For frame distance ``r = |f_q - f_k|`` the band is
    ``k = bit_length(r // window)`` (band 0: ``r < window``, band k: ``window*2**(k-1) <= r < window*2**k``)
    and ``P = 2**k``. A key is allowed when

    * spatially close: ``|s_q - s_k| * P < frame`` (the spatial window shrinks by half per band), and
    * on the band's temporal lattice: ``r % max(1, P // frame) == 0`` (once the spatial window is a
      single token, only every ``P // frame``-th frame is kept).

    So band 0 is dense, and every later band holds about ``window * frame`` keys per query (two-sided),
    giving ``O(n log n)`` pairs in all. Causal (off by default: video diffusion is bidirectional) also
    requires ``j <= p``. Reading: the paper's mask is a per-frame-pair band; this is that rule with the
    band width and temporal subsampling written as powers of two so it is exact on integers.
    """

    window: int
    frame: int = 1
    causal: bool = False

    def __post_init__(self):
        positive_int("window", self.window)
        positive_int("frame", self.frame)

    def mask_mod(self, b, h, q_idx, kv_idx):
        F_ = self.frame
        fq, fk = q_idx // F_, kv_idx // F_
        r = torch.abs(fq - fk)
        P = _next_pow2_above(r // self.window)
        ok = (torch.abs(q_idx % F_ - kv_idx % F_) * P < F_) & (r % torch.clamp(P // F_, min=1) == 0)
        return ok & (kv_idx <= q_idx) if self.causal else ok

    def _frame_tables(self, nframes: int) -> tuple[np.ndarray, np.ndarray]:
        """Per frame distance r: the band's power P and whether the frame is on the temporal lattice."""
        P = np.array([1 << (r // self.window).bit_length() for r in range(nframes)], dtype=np.int64)
        keep = np.array([r % max(1, int(P[r]) // self.frame) == 0 for r in range(nframes)])
        return P, keep

    def _dense(self, q_len, kv_len, q_offset):
        F_ = self.frame
        nframes = max(kv_len, q_offset + q_len) // F_ + 1
        P, keep = self._frame_tables(nframes)
        qp = np.arange(q_offset, q_offset + q_len)[:, None]
        kp = np.arange(kv_len)[None, :]
        r = np.abs(qp // F_ - kp // F_)
        m = keep[r] & (np.abs(qp % F_ - kp % F_) * P[r] < F_)
        if self.causal:
            m &= kp <= qp
        return torch.from_numpy(m)

    def count(self, q_len, kv_len, q_offset=0):
        F_, w = self.frame, self.window
        p = torch.arange(q_offset, q_offset + q_len, dtype=torch.int64)
        fq, sq = p // F_, p % F_
        U = torch.clamp(p + 1, max=kv_len) if self.causal else torch.full_like(p, kv_len)
        NF = U // F_  # frames 0..NF-1 are complete and allowed in full (causality included)
        avail = U - NF * F_  # tokens of frame NF that exist (0: no partial frame)
        rP = torch.abs(fq - NF)

        def multiples(a: Tensor, b_: Tensor, t: int) -> Tensor:
            """How many r in [a, b] are multiples of t (a >= 0)."""
            n = torch.div(b_, t, rounding_mode="floor") - torch.div(a - 1, t, rounding_mode="floor")
            return torch.where(b_ >= a, n, 0)

        def spatial(m: int, n: Tensor | int) -> Tensor:
            """Tokens s in [0, n) with |s - sq| <= m."""
            hi = torch.minimum(sq + m, torch.as_tensor(n) - 1)
            return (hi - torch.clamp(sq - m, min=0) + 1).clamp(min=0)

        total = torch.zeros(q_len, dtype=torch.int64)
        max_r = max(kv_len, q_offset + q_len) // F_ + 1
        k = 0
        while True:
            lo = 0 if k == 0 else w << (k - 1)
            if lo > max_r:
                break
            hi = (w << k) - 1
            P = 1 << k
            t = max(1, P // F_)
            m = (F_ - 1) // P
            back = multiples(torch.clamp(fq - NF + 1, min=lo), torch.clamp(fq, max=hi), t)
            fwd = multiples(torch.full_like(fq, max(lo, 1)), torch.clamp(NF - 1 - fq, max=hi), t)
            total += (back + fwd) * spatial(m, F_)
            in_band = (avail > 0) & (rP >= lo) & (rP <= hi) & (rP % t == 0)
            total += torch.where(in_band, spatial(m, avail), 0)
            k += 1
        return float(total.sum())

    @property
    def is_causal(self) -> bool:
        return self.causal


@dataclass(frozen=True)
class FITGroups(Pattern):
    """FIT (P4) as one mask: interleaved groups ``[latents | tokens]`` of ``latents + group`` positions.

    Group ``g`` occupies ``g*(latents+group) ..`` with its ``latents`` latent tokens first. A data token
    sees its own group (local layer: the group's tokens; cross-attention: the group's latents); a
    latent sees its own group's tokens (cross-attention read) and every latent (global layer).
    So ``allowed = same_group(q, k) | (latent(q) & latent(k))``; ``causal`` adds ``j <= p``
    (FIT as an autoregressive decoder). This folds FIT's interleaved local/global layers into one
    attention over the concatenated sequence -- how FIT "fits as a pattern"; the real model runs the
    parts as separate layers.
    """

    group: int
    latents: int = 1
    causal: bool = False

    def __post_init__(self):
        positive_int("group", self.group)
        positive_int("latents", self.latents)

    @property
    def period(self) -> int:
        return self.group + self.latents

    def mask_mod(self, b, h, q_idx, kv_idx):
        P = self.period
        ok = (q_idx // P == kv_idx // P) | ((q_idx % P < self.latents) & (kv_idx % P < self.latents))
        return ok & (kv_idx <= q_idx) if self.causal else ok

    def _dense(self, q_len, kv_len, q_offset):
        P, n = self.period, max(kv_len, q_offset + q_len)
        m = torch.zeros(n, n, dtype=torch.bool)
        lat = [j for g0 in range(0, n, P) for j in range(g0, min(g0 + self.latents, n))]
        for g0 in range(0, n, P):
            m[g0 : g0 + P, g0 : g0 + P] = True
        m[torch.tensor(lat)[:, None], torch.tensor(lat)[None, :]] = True
        if self.causal:
            m = m.tril()
        return m[q_offset : q_offset + q_len, :kv_len]

    def count(self, q_len, kv_len, q_offset=0):
        P, nl = self.period, self.latents
        r = _rows(q_len, q_offset)
        U = torch.clamp(r + 1, max=kv_len) if self.causal else torch.full_like(r, kv_len)
        g0 = torch.floor(r / P) * P
        own = (torch.minimum(g0 + P, U) - g0).clamp(min=0)

        def latents_below(m):
            return torch.floor(m / P) * nl + torch.remainder(m, P).clamp(max=nl)

        own_lat = (torch.minimum(g0 + nl, U) - g0).clamp(min=0)
        is_lat = (r - g0) < nl
        return float((own + torch.where(is_lat, latents_below(U) - own_lat, 0)).sum())

    @property
    def is_causal(self) -> bool:
        return self.causal


__all__ = ["PowerAttention", "Radial", "FITGroups"]
