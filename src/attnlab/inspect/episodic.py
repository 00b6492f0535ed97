"""Episodic-memory measures of attention over lags, on repeated random-token sequences.

A sequence holds ``n`` random tokens ``x_0 .. x_{n-1}`` (the *first presentation*, positions ``start + j``),
then the same tokens again (the *repeat*, positions ``start + n + i``). The query at repeat position
``start + n + i`` holds token ``x_i``, whose first occurrence is at ``start + i``; its weight on the first-
presentation key ``start + j`` is a "transition" at lag ``L = j - i`` (Mistry et al., A131; Ji-An et al., A163).
An induction head attends to lag +1 (the token after the first occurrence), a duplicate-token head to lag 0.

Conventions (``LagCRP``; ``F_b[i, j]`` = weight of repeat query ``i`` on first-presentation key ``j`` in
sequence ``b``; ``m_b[i] = sum_j F_b[i, j]``, the row's mass on the first presentation):

* Lag-CRP as in free recall (Kahana 1996): the attention at lag ``L`` divided by what was available at ``L``.
  An *opportunity* at ``L`` is a (sequence, row) pair whose lag ``L`` lands inside the first presentation
  (``0 <= i + L < n``: ``n - |L|`` per sequence; every first-presentation key is visible to every repeat
  query, causal or not, so the mask censors no lag). Default (``renormalize=True``)::

      CRP(L) = sum_{b, i : 0 <= i+L < n} F_b[i, i + L]  /  sum_{b, i : 0 <= i+L < n} m_b[i]

  i.e. each repeat row is a recall event over the ``n`` first-presentation items, renormalized to a
  distribution ``F / m`` and weighted by ``m`` (what it retrieves from the first presentation at all): the
  probability of lag ``L`` given a retrieval from the first presentation and that ``L`` was available. Rows
  that barely look at the first presentation count as little as they look (an unweighted mean of renormalized
  rows would blow a row's 1e-3 of leftover mass up to a whole recall event). ``renormalize=False``: the mean
  raw weight per opportunity, ``sum F / #opportunities``. The share itself is ``first_copy_mass`` (mean ``m``).
  A head spreading each row's first-presentation mass evenly has a flat ``CRP(L) = 1/n`` (renormalized);
  lag 0 (the current token's own first occurrence) is kept (free recall has no lag 0). NaN: no row with an
  opportunity at ``L`` put mass on the first presentation.
* ``asymmetry = (CRP(+1) - CRP(-1)) / (CRP(+1) + CRP(-1))`` in [-1, 1] (forward > 0);
  ``contiguity(K) = (CRP(+1) + CRP(-1)) / 2 - mean_{2 <= |L| <= K} CRP(L)`` (excess on the neighbours over
  remote lags; 0 for a flat curve).
* Serial-position curve ``spc[j] = sum_{b,i} F_b[i, j] / sum_{b,i} m_b[i]`` (sums to 1 over ``j``);
  ``primacy = n * spc[0]`` and ``recency = n * spc[n-1]`` (1 = as much as an even spread). The first item is
  not the attention sink when a BOS token precedes the list, which ``repeat_sequences`` ensures by default.
  Recency is partly locality: the first repeat rows' nearest first-presentation keys are the last items.

CMR-likeness (A163) -- ``cmr_fit``: the lag-CRP of the context-drift model CMR decays roughly exponentially
with ``|L|`` on both sides, higher forward than backward. We fit that *shape* (not the CMR model with its
encoding/retrieval parameters) by least squares on lags ``1 <= |L| <= K``, lag 0 left out::

    CRP(L) ~ b + a_fwd * r ** (L - 1)      (L > 0)
    CRP(L) ~ b + a_bwd * r ** (|L| - 1)    (L < 0)

``r`` on a grid in [0, 0.99] (``r = 0``: only the neighbours, a pure spike), ``b, a_fwd, a_bwd`` by linear least
squares for each ``r``. Reported: the parameters, ``r2 = 1 - SSE / SST`` (NaN for a flat curve: nothing to
explain) and ``rmse``. Named the *two-sided exponential CRP fit*; ``r2`` is its fit quality (A163's
"CMR distance" fits the full model; this is a cheaper proxy).

``episodic_scan(model, tok)`` runs the whole thing on a model: it builds the sequences with the head atlas's
induction probe, captures every layer's weights on the hook seam (``hf.run_with_cache``) and also returns the
atlas's induction (prefix-matching) score per head, computed by ``metrics.head_metrics`` on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf
from .capture import forward_kwargs
from .metrics import ProbeSpec, check_weights, head_metrics
from .probes import induction_probe


# ---------------------------------------------------------------------------------------------------------
# layout and validation
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RepeatLayout:
    """Where the two presentations sit: first at ``[start, start + length)``, repeat at
    ``[start + length, start + 2 * length)``. Positions are absolute (key indices)."""

    start: int
    length: int

    def __post_init__(self):
        if self.start < 0:
            raise ValueError(f"RepeatLayout.start must be >= 0, got {self.start}")
        if self.length < 2:
            raise ValueError(f"RepeatLayout.length must be >= 2 (a lag needs two items), got {self.length}")

    @property
    def end(self) -> int:
        """One past the last repeat position."""
        return self.start + 2 * self.length


def _check_weights(weights: Tensor, layout: RepeatLayout, q_offset: int | None) -> int:
    """Validate ``(B, H, Tq, Tk)`` weights against the layout; returns the absolute position of row 0."""
    if not isinstance(weights, Tensor) or weights.dim() != 4:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a (batch, heads, queries, keys) tensor, got {shape}")
    B, H, Tq, Tk = weights.shape
    if min(B, H, Tq, Tk) == 0:
        raise ValueError(f"weights are empty: shape {tuple(weights.shape)}")
    q0 = Tk - Tq if q_offset is None else int(q_offset)  # default: queries are the last Tq positions
    if q0 < 0 or q0 + Tq > Tk:
        raise ValueError(f"query rows [{q0}, {q0 + Tq}) do not fit in {Tk} keys")
    if layout.end > Tk:
        raise ValueError(f"the layout needs {layout.end} positions (start {layout.start} + 2 x {layout.length}), "
                         f"the weights have {Tk} keys")
    first_q, last_q = layout.start + layout.length, layout.end - 1
    if first_q < q0 or last_q >= q0 + Tq:
        raise ValueError(f"the repeat queries [{first_q}, {last_q}] are not all among the rows [{q0}, {q0 + Tq})")
    check_weights(weights)
    return q0


# ---------------------------------------------------------------------------------------------------------
# lag-CRP and what derives from it
# ---------------------------------------------------------------------------------------------------------
@dataclass
class LagCRP:
    """Lag-CRP and serial-position curve per head (leading dims ``...``: ``(H,)`` from one weight tensor,
    ``(L, H)`` from ``episodic_scan``).

    ``lags``: ``(2n-1,)`` ints ``-(n-1) .. n-1``; ``crp``: ``(..., 2n-1)`` float64 (NaN where the rows with that
    lag put no mass on the first presentation); ``opportunities``: ``(..., 2n-1)`` (sequence, row) pairs per
    lag, ``B * (n - |L|)``; ``spc``: ``(..., n)``;
    ``first_copy_mass``: ``(...)`` mean share of a repeat row's attention on the first presentation;
    ``renormalized``: the convention used.
    """

    lags: Tensor
    crp: Tensor
    opportunities: Tensor
    spc: Tensor
    first_copy_mass: Tensor
    renormalized: bool = True

    @property
    def length(self) -> int:
        return int(self.spc.shape[-1])

    def at(self, lag: int) -> Tensor:
        """``(...)`` CRP at one lag."""
        n = self.length
        if not -(n - 1) <= lag <= n - 1:
            raise ValueError(f"lag {lag} is outside [-{n - 1}, {n - 1}] for lists of {n} items")
        return self.crp[..., lag + n - 1]

    @property
    def asymmetry(self) -> Tensor:
        """``(CRP(+1) - CRP(-1)) / (CRP(+1) + CRP(-1))``, NaN where both are 0."""
        f, b = self.at(1), self.at(-1)
        s = f + b
        return torch.where(s > 0, (f - b) / s.clamp_min(1e-300), torch.full_like(s, float("nan")))

    def contiguity(self, max_lag: int = 5) -> Tensor:
        """Mean CRP at lags +-1 minus mean CRP over ``2 <= |L| <= max_lag`` (NaN if the list is too short)."""
        K = min(max_lag, self.length - 1)
        near = (self.at(1) + self.at(-1)) / 2
        if K < 2:
            return torch.full_like(near, float("nan"))
        far = torch.stack([self.at(s * k) for k in range(2, K + 1) for s in (1, -1)], -1).mean(-1)
        return near - far

    @property
    def primacy(self) -> Tensor:
        """``n * spc[0]``: attention to the first item of the first presentation relative to an even spread."""
        return self.spc[..., 0] * self.length

    @property
    def recency(self) -> Tensor:
        """``n * spc[n-1]``: attention to the last item of the first presentation relative to an even spread."""
        return self.spc[..., -1] * self.length

    def peak_lag(self, max_lag: int | None = None) -> Tensor:
        """``(...)`` long: the lag with the largest CRP among ``|L| <= max_lag`` (None: every lag; lag 0
        included; NaN CRPs never win). The widest lags have one opportunity per sequence (the last repeat row
        on the first item, the first repeat row on the last item, which is its previous token), so a window
        keeps them from dominating, as lag-CRP plots in free recall do."""
        keep = torch.ones_like(self.lags, dtype=torch.bool) if max_lag is None else self.lags.abs() <= max_lag
        if not bool(keep.any()):
            raise ValueError(f"max_lag must be >= 0, got {max_lag}")
        c = self.crp.nan_to_num(float("-inf"))[..., keep]
        return self.lags[keep][c.argmax(-1)]


def lag_crp(weights: Tensor, layout: RepeatLayout, q_offset: int | None = None,
            renormalize: bool = True) -> LagCRP:
    """Lag-CRP of every head from attention weights.

    Args:
        weights: ``(B, H, Tq, Tk)``, rows sum to at most 1; the ``B`` sequences share ``layout``.
        layout: where the first presentation and the repeat are.
        q_offset: absolute position of query row 0 (default ``Tk - Tq``: the queries are the last positions).
        renormalize: condition on retrieval from the first presentation (rows renormalized, each weighted by
            its first-presentation mass; see module docs); False: the mean raw weight per opportunity.

    Returns a ``LagCRP`` with leading dim ``(H,)``.
    """
    q0 = _check_weights(weights, layout, q_offset)
    B, H = weights.shape[:2]
    n, s = layout.length, layout.start
    # F[b, h, i, j]: repeat query i (position s + n + i) on first-presentation key j (position s + j)
    F = weights[:, :, s + n - q0:s + 2 * n - q0, s:s + n].double()
    mass = F.sum(-1)  # (B, H, n) each row's mass on the first presentation
    # each (row i, key j) pair is one opportunity at lag j - i; the denominator adds, per opportunity, the row's
    # first-presentation mass (renormalized: rows weighted by what they retrieve) or 1 (raw: mean weight)
    per_row = mass if renormalize else torch.ones_like(mass)
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    lag_idx = (j - i + n - 1).flatten()  # (n*n,) index into lags -(n-1) .. n-1
    num = torch.zeros(H, 2 * n - 1, dtype=torch.float64).index_add_(1, lag_idx, F.sum(0).reshape(H, n * n))
    den_pairs = per_row.sum(0).unsqueeze(-1).expand(H, n, n).reshape(H, n * n)
    den = torch.zeros(H, 2 * n - 1, dtype=torch.float64).index_add_(1, lag_idx, den_pairs)
    opp = torch.zeros(2 * n - 1, dtype=torch.float64).index_add_(0, lag_idx, torch.ones(n * n, dtype=torch.float64))
    nan = torch.full_like(num, float("nan"))
    crp = torch.where(den > 1e-12, num / den.clamp_min(1e-300), nan)
    tot = per_row.sum((0, 2))  # (H,)
    spc = torch.where(tot.unsqueeze(-1) > 1e-12, F.sum((0, 2)) / tot.clamp_min(1e-300).unsqueeze(-1),
                      torch.full((H, n), float("nan"), dtype=torch.float64))
    return LagCRP(torch.arange(-(n - 1), n), crp, (opp * B).expand(H, -1).clone(), spc, mass.mean((0, 2)),
                  renormalize)


# ---------------------------------------------------------------------------------------------------------
# the two-sided exponential (CMR-style) fit
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CMRFit:
    """Two-sided exponential fit of a lag-CRP (see module docs); every field ``(...)`` float64.

    ``b`` baseline, ``a_fwd`` / ``a_bwd`` amplitudes at lags +1 / -1 above it, ``r`` decay per lag step,
    ``r2`` fit quality (NaN for a flat curve), ``rmse`` root mean squared residual; ``max_lag`` lags fitted.
    """

    b: Tensor
    a_fwd: Tensor
    a_bwd: Tensor
    r: Tensor
    r2: Tensor
    rmse: Tensor
    max_lag: int

    def curve(self, lags: Tensor) -> Tensor:
        """``(..., len(lags))`` fitted values (lag 0 gets the baseline: it is not fitted)."""
        lags = lags.to(torch.float64)
        dist = (lags.abs() - 1).clamp_min(0)
        decay = self.r.unsqueeze(-1) ** dist
        amp = torch.where(lags > 0, self.a_fwd.unsqueeze(-1), self.a_bwd.unsqueeze(-1)) * (lags != 0)
        return self.b.unsqueeze(-1) + amp * decay


def cmr_fit(crp: LagCRP | Tensor, max_lag: int = 5, grid: int = 100) -> CMRFit:
    """Least-squares two-sided exponential fit of lag-CRPs on lags ``1 <= |L| <= max_lag``.

    Args:
        crp: a ``LagCRP`` or a tensor ``(..., 2n-1)`` over lags ``-(n-1) .. n-1``.
        max_lag: widest lag fitted (capped at ``n - 1``; at least 2 is needed: 4 points, 4 parameters).
        grid: number of decay values ``r`` tried, evenly in [0, 0.99].
    """
    y_all = crp.crp if isinstance(crp, LagCRP) else torch.as_tensor(crp, dtype=torch.float64)
    if y_all.dim() < 1 or y_all.shape[-1] % 2 == 0:
        raise ValueError(f"a lag-CRP has an odd last dim (lags -(n-1) .. n-1), got shape {tuple(y_all.shape)}")
    n = (y_all.shape[-1] + 1) // 2
    K = min(int(max_lag), n - 1)
    if K < 2:
        raise ValueError(f"the fit needs lags up to at least 2 (max_lag={max_lag}, lists of {n} items)")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    lags = torch.cat([torch.arange(1, K + 1), -torch.arange(1, K + 1)])
    lead = y_all.shape[:-1]
    Y = y_all.double()[..., lags + n - 1].reshape(-1, 2 * K).T  # (2K, N)
    bad = Y.isnan().any(0)
    Y = Y.nan_to_num(0.0)
    dist = (lags.abs() - 1).double()
    fwd, bwd = (lags > 0).double(), (lags < 0).double()
    best = None
    for r in torch.linspace(0.0, 0.99, grid, dtype=torch.float64):
        d = r ** dist  # 0 ** 0 = 1: r = 0 is a spike on the neighbours
        X = torch.stack([torch.ones_like(d), fwd * d, bwd * d], 1)  # (2K, 3)
        coef = torch.linalg.lstsq(X, Y).solution  # (3, N)
        sse = ((X @ coef - Y) ** 2).sum(0)
        if best is None:
            best = [sse, coef, torch.full_like(sse, float(r))]
        else:
            better = sse < best[0] - 1e-15  # strict: ties keep the smaller r
            best[0] = torch.where(better, sse, best[0])
            best[1] = torch.where(better, coef, best[1])
            best[2] = torch.where(better, torch.full_like(sse, float(r)), best[2])
    sse, coef, r = best
    sst = ((Y - Y.mean(0)) ** 2).sum(0)
    r2 = torch.where(sst > 1e-30, 1 - sse / sst.clamp_min(1e-300), torch.full_like(sse, float("nan")))
    rmse = (sse / (2 * K)).sqrt()
    nan = torch.full_like(sse, float("nan"))
    out = [torch.where(bad, nan, t).reshape(lead) for t in (coef[0], coef[1], coef[2], r, r2, rmse)]
    return CMRFit(*out, max_lag=K)


# ---------------------------------------------------------------------------------------------------------
# on a model
# ---------------------------------------------------------------------------------------------------------
def repeat_sequences(tok, length: int = 40, batch: int = 4, seed: int = 0,
                     bos: bool = True) -> tuple[Tensor, RepeatLayout]:
    """``batch`` sequences of ``length`` random ordinary tokens (no repeats within a list) then the same tokens
    again, inside the tokenizer's special tokens (the head atlas's induction probe, seeds ``seed .. seed +
    batch - 1``). ``bos``: when the tokenizer adds no leading special token, put its BOS (else EOS) first, so
    the first list item is not the attention sink. Returns ids ``(batch, T)`` and the layout."""
    if length < 2 or batch < 1:
        raise ValueError(f"need length >= 2 and batch >= 1, got length={length}, batch={batch}")
    special = set(tok.all_special_ids)
    seqs = []
    for b in range(batch):
        ids = induction_probe(tok, length, seed + b).input_ids[0].tolist()
        lead = 0
        while lead < len(ids) and ids[lead] in special:
            lead += 1
        if lead == 0 and bos:
            first = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if first is not None:
                ids, lead = [first, *ids], 1
        seqs.append((ids, lead))
    if len({(len(s), lead) for s, lead in seqs}) != 1:
        raise ValueError("the probe sequences differ in layout across seeds")
    lead = seqs[0][1]
    ids = torch.tensor([s for s, _ in seqs])
    layout = RepeatLayout(lead, length)
    # the probe promises x + x after the leading specials; check rather than trust
    if not bool((ids[:, lead:lead + length] == ids[:, lead + length:lead + 2 * length]).all()):
        raise ValueError("the probe did not produce a repeated sequence where expected")
    return ids, layout


@dataclass
class EpisodicScan:
    """Episodic measures of every head of a model: ``crp`` (``LagCRP`` with leading ``(L, H)``), ``fit``
    (``CMRFit`` ``(L, H)``), ``induction`` ``(L, H)`` (the atlas's prefix-matching score on the same
    weights, mean over the batch), the ``input_ids`` ``(B, T)`` and ``layout`` used."""

    crp: LagCRP
    fit: CMRFit
    induction: Tensor
    input_ids: Tensor
    layout: RepeatLayout

    def top_induction(self) -> tuple[int, int]:
        """(layer, head) with the largest induction score."""
        H = self.induction.shape[1]
        idx = int(self.induction.nan_to_num(float("-inf")).flatten().argmax())
        return divmod(idx, H)

    def head(self, layer: int, head: int, max_lag: int = 5) -> dict[str, float]:
        """Every scalar measure of one head."""
        c = self.crp
        return {
            "induction": float(self.induction[layer, head]),
            "peak_lag": int(c.peak_lag(max_lag)[layer, head]),
            "crp+1": float(c.at(1)[layer, head]), "crp-1": float(c.at(-1)[layer, head]),
            "crp0": float(c.at(0)[layer, head]),
            "asymmetry": float(c.asymmetry[layer, head]), "contiguity": float(c.contiguity(max_lag)[layer, head]),
            "primacy": float(c.primacy[layer, head]), "recency": float(c.recency[layer, head]),
            "first_copy_mass": float(c.first_copy_mass[layer, head]),
            "fit_r": float(self.fit.r[layer, head]), "fit_r2": float(self.fit.r2[layer, head]),
            "fit_a_fwd": float(self.fit.a_fwd[layer, head]), "fit_a_bwd": float(self.fit.a_bwd[layer, head]),
        }


def episodic_scan(
    model: nn.Module, tok=None, *, input_ids: Tensor | None = None, layout: RepeatLayout | None = None,
    length: int = 40, batch: int = 4, seed: int = 0, bos: bool = True, renormalize: bool = True,
    max_lag: int = 5,
) -> EpisodicScan:
    """Run ``model`` on repeated random sequences and measure every head.

    Either ``tok`` (sequences from ``repeat_sequences(tok, length, batch, seed, bos)``) or ``input_ids``
    ``(B, T)`` with their ``layout``. Whatever attention runs in ``model`` is measured (its own, or an op or
    plan installed with ``hf.use``): the weights come from the seam's ``blocks.*.attn.weights`` point, only the
    rows from the repeat on are kept.
    """
    if input_ids is None:
        if tok is None:
            raise ValueError("episodic_scan needs a tokenizer or input_ids with a layout")
        input_ids, layout = repeat_sequences(tok, length, batch, seed, bos)
    elif layout is None:
        raise ValueError("input_ids need their layout (RepeatLayout(start, length))")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, T), got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if layout.end > T:
        raise ValueError(f"the layout needs {layout.end} tokens, input_ids have {T}")
    if not bool((input_ids[:, layout.start:layout.start + layout.length]
                 == input_ids[:, layout.start + layout.length:layout.end]).all()):
        raise ValueError("input_ids do not repeat their first presentation at the layout's positions")
    q0 = layout.start + layout.length
    causal = hf.geometry(model).is_causal
    kw = forward_kwargs(model, input_ids)  # no KV cache, one row of logits: we only read the weights
    kw.pop("input_ids")
    _, store = hf.run_with_cache(model, input_ids, ["blocks.*.attn.weights"], rows=(q0, T), **kw)
    layers = sorted(int(k.split(".")[1]) for k in store)
    crps, ind = [], []
    for layer in layers:
        w = store[f"blocks.{layer}.attn.weights"].float()  # (B, H, T - q0, T)
        crps.append(lag_crp(w, layout, q_offset=q0, renormalize=renormalize))
        # the atlas's induction score, same definition and code (rows are the last T - q0 positions)
        per_seq = [head_metrics(w[b], spec=ProbeSpec(tokens=tuple(input_ids[b].tolist())), causal=causal)[0]
                   ["induction"] for b in range(w.shape[0])]
        ind.append(torch.stack(per_seq).mean(0))
    first = crps[0]
    stacked = LagCRP(first.lags, *(torch.stack([getattr(c, f) for c in crps]) for f in
                                   ("crp", "opportunities", "spc", "first_copy_mass")),
                     renormalized=renormalize)
    return EpisodicScan(stacked, cmr_fit(stacked, max_lag), torch.stack(ind), input_ids, layout)


__all__ = ["CMRFit", "EpisodicScan", "LagCRP", "RepeatLayout", "cmr_fit", "episodic_scan", "lag_crp",
           "repeat_sequences"]
