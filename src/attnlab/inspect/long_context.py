"""Query-adaptive long-context head identification from local keys only (A141, "Unveiling Simplicities of
Attention: Adaptive Long-Context Head Identification").

For a query ``i`` of head ``h`` the visible keys split into a *local* set ``L_i`` (the first ``sinks`` keys and
the last ``window`` keys up to ``i``) and the *bulk* ``B_i`` (every other visible key, ``N_i`` of them). The
head needs long context for that query when the bulk carries a large share of the softmax mass,

    rho_i = sum_{j in B_i} exp(s_ij) / sum_{j visible} exp(s_ij)        (the oracle; needs every key).

A141 predicts it without scoring the bulk keys one by one: the bulk's scores are modelled as a Gaussian
from the first and second moments of the bulk keys, ``mu_K`` and ``Sigma_K`` (kept as running statistics,
``O(D^2)`` per query instead of ``O(N_i D)``), so ``s ~ N(m_i, v_i)`` with ``m_i = q_i . mu_K`` and
``v_i = q_i^T Sigma_K q_i`` (times the score scale), ``E[exp(s)] = exp(m_i + v_i / 2)``, and only the local
keys are scored exactly:

    log Zhat_bulk = log N_i + m_i + v_i / 2,     rho_hat_i = Zhat_bulk / (Zhat_bulk + sum_{j in L_i} exp(s_ij)).

``q . mu_K`` and ``q^T Sigma_K q`` are exactly the mean and the (population) variance of the bulk scores, so
they are computed from the scores here (the same numbers, no ``D x D`` matrix). ``moments="window"`` is a
cruder variant that takes the moments from the window keys (the local keys minus the sinks) instead, so that
nothing about the bulk is read at all; it fails when the window is unlike the bulk (a local head).

The scores are the scaled ``q . k`` the layer really uses (seam point ``blocks.{l}.attn.scores``). A query is
labelled *long* when ``rho_hat_i >= threshold`` (default 0.1, our choice). Per head we report the share of
queries labelled long (estimate and oracle), the agreement of the labels, the correlation of ``rho_hat``
with ``rho``, and the spread of ``rho`` over queries (A141's point: some heads stay local, others swing with
the query).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf


@dataclass(frozen=True)
class LongContextConfig:
    """``sinks`` first keys and the last ``window`` keys (the query's own included) are local; a query is long
    when its (estimated) bulk share is at least ``threshold``; only queries with at least ``min_bulk`` bulk keys
    count."""

    sinks: int = 4
    window: int = 32
    threshold: float = 0.1
    min_bulk: int = 1
    moments: str = "bulk"  # "bulk": mu_K, Sigma_K of the bulk keys (A141); "window": of the window keys

    def __post_init__(self):
        if self.sinks < 0:
            raise ValueError(f"LongContextConfig.sinks must be >= 0, got {self.sinks}")
        if self.window < 2:
            raise ValueError(f"LongContextConfig.window must be >= 2 (a variance needs two keys), got {self.window}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"LongContextConfig.threshold must be in (0, 1), got {self.threshold}")
        if self.moments not in ("bulk", "window"):
            raise ValueError(f"LongContextConfig.moments must be 'bulk' or 'window', got {self.moments!r}")
        if self.min_bulk < 1:
            raise ValueError(f"LongContextConfig.min_bulk must be >= 1, got {self.min_bulk}")


def split_keys(q_pos: Tensor, visible: Tensor, cfg: LongContextConfig) -> tuple[Tensor, Tensor, Tensor]:
    """``q_pos (r,)`` absolute query positions, ``visible (r, Tk)`` bool -> ``(local, window, bulk)`` bool masks
    ``(r, Tk)``: local = sinks + window, window = the last ``window`` visible keys up to the query minus the sinks,
    bulk = visible and not local."""
    kpos = torch.arange(visible.shape[-1]).view(1, -1)
    qp = q_pos.view(-1, 1)
    sink = kpos < cfg.sinks
    recent = (kpos <= qp) & (kpos > qp - cfg.window)
    local = visible & (sink | recent)
    return local, visible & recent & ~sink, visible & ~local


def bulk_shares(scores: Tensor, q_pos: Tensor, visible: Tensor,
                cfg: LongContextConfig = LongContextConfig()) -> tuple[Tensor, Tensor]:
    """``scores (H, r, Tk)`` scaled scores of rows at ``q_pos (r,)``, ``visible (r, Tk)`` or ``(H, r, Tk)`` ->
    ``(rho_hat, rho)`` each ``(H, r)``: the local-keys estimate of the bulk's softmax share and the true share;
    NaN for rows with fewer than ``min_bulk`` bulk keys or fewer than two moment keys."""
    s = scores.double()
    vis = visible.expand_as(s) if visible.dim() == 3 else visible.unsqueeze(0).expand_as(s)
    local, win, bulk = (m for m in split_keys(q_pos, vis, cfg))
    neg = torch.tensor(float("-inf"), dtype=s.dtype)
    lse = lambda m: torch.logsumexp(torch.where(m, s, neg), -1)  # noqa: E731
    log_all, log_local, log_bulk = lse(vis), lse(local), lse(bulk)
    rho = torch.exp(log_bulk - log_all)
    mom = bulk if cfg.moments == "bulk" else win
    n_w = mom.sum(-1).double()
    mu = torch.where(mom, s, 0.0).sum(-1) / n_w.clamp_min(1)
    var = torch.where(mom, (s - mu.unsqueeze(-1)) ** 2, 0.0).sum(-1) / n_w.clamp_min(1)
    n_b = bulk.sum(-1)
    log_hat = torch.log(n_b.double().clamp_min(1)) + mu + var / 2
    rho_hat = torch.sigmoid(log_hat - log_local)
    ok = (n_b >= cfg.min_bulk) & (n_w >= 2)
    nan = torch.full_like(rho, float("nan"))
    return torch.where(ok, rho_hat, nan), torch.where(ok, rho, nan)


def _corr(a: Tensor, b: Tensor) -> float:
    ok = ~(a.isnan() | b.isnan())
    a, b = a[ok], b[ok]
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / den if den > 0 else float("nan")


@dataclass(frozen=True)
class LongContextHeads:
    """Per (layer, head) summaries over the measured queries.

    Attributes:
        est_long, true_long: ``(L, H)`` share of queries labelled long by ``rho_hat`` / by the oracle ``rho``.
        agreement: ``(L, H)`` share of queries where the two labels agree.
        corr: ``(L, H)`` Pearson correlation of ``rho_hat`` and ``rho`` over queries.
        rho_mean, rho_std: ``(L, H)`` mean and spread of the true bulk share over queries.
        queries: number of measured query rows.
    """

    est_long: Tensor
    true_long: Tensor
    agreement: Tensor
    corr: Tensor
    rho_mean: Tensor
    rho_std: Tensor
    queries: int
    cfg: LongContextConfig

    def top(self, k: int = 10) -> list[tuple[tuple[int, int], float]]:
        """Heads with the largest estimated long share."""
        flat = self.est_long.flatten()
        idx = flat.argsort(descending=True)[:k]
        H = self.est_long.shape[1]
        return [((int(i) // H, int(i) % H), float(flat[i])) for i in idx]

    def summary(self) -> dict[str, float]:
        """Over all heads: the share of (head, query) pairs labelled alike, and how many heads the estimate and
        the oracle call long-context (long for at least half of the queries)."""
        return {"agreement": float(self.agreement.mean()),
                "corr_median": float(self.corr.nanmedian()),
                "heads_long_est": int((self.est_long >= 0.5).sum()),
                "heads_long_true": int((self.true_long >= 0.5).sum()),
                "heads_adaptive_true": int(((self.true_long > 0.1) & (self.true_long < 0.9)).sum())}

    def per_layer(self) -> list[dict[str, float]]:
        return [{"layer": layer, "est_long": float(self.est_long[layer].mean()),
                 "true_long": float(self.true_long[layer].mean()), "agreement": float(self.agreement[layer].mean()),
                 "corr": float(self.corr[layer].nanmean()), "rho_mean": float(self.rho_mean[layer].mean()),
                 "rho_std": float(self.rho_std[layer].mean())} for layer in range(self.est_long.shape[0])]

    def to_dict(self) -> dict:
        return {"cfg": self.cfg.__dict__, "queries": self.queries, "est_long": self.est_long.tolist(),
                "true_long": self.true_long.tolist(), "agreement": self.agreement.tolist(),
                "corr": self.corr.tolist(), "rho_mean": self.rho_mean.tolist(), "rho_std": self.rho_std.tolist(),
                "summary": self.summary(), "per_layer": self.per_layer(), "top": self.top()}


def summarize(rho_hat: Tensor, rho: Tensor, threshold: float) -> dict[str, Tensor]:
    """``rho_hat, rho (H, n)`` (NaN rows dropped) -> per-head ``est_long, true_long, agreement, corr, rho_mean,
    rho_std`` ``(H,)``."""
    out = {n: torch.full((rho.shape[0],), float("nan"), dtype=torch.float64)
           for n in ("est_long", "true_long", "agreement", "corr", "rho_mean", "rho_std")}
    for h in range(rho.shape[0]):
        ok = ~(rho[h].isnan() | rho_hat[h].isnan())
        a, b = rho_hat[h][ok], rho[h][ok]
        if a.numel() == 0:
            continue
        la, lb = a >= threshold, b >= threshold
        out["est_long"][h] = la.double().mean()
        out["true_long"][h] = lb.double().mean()
        out["agreement"][h] = (la == lb).double().mean()
        out["corr"][h] = _corr(a, b)
        out["rho_mean"][h] = b.mean()
        out["rho_std"][h] = b.std(unbiased=False)
    return out


def long_context_heads(model: nn.Module, ids: Tensor, cfg: LongContextConfig = LongContextConfig()) -> LongContextHeads:
    """Run ``ids (1, T)`` once and score every head (module docstring). Rows are read chunk by chunk from the
    ``scores`` hook; the visible keys are the hook's mask (sliding windows, plans), else the causal rule."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one sequence (1, T), got shape {tuple(ids.shape)}")
    g = hf.geometry(model)
    if not g.is_causal:
        raise ValueError("long_context_heads needs a causal model (local = sinks + recent keys)")
    parts: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def obs(sc: Tensor, ctx) -> None:  # sc (1, H, r, Tk)
        s, e = ctx.rows
        q_pos = torch.arange(s, e) + int(ctx.q_offset or 0)
        if ctx.mask is not None:
            vis = ctx.mask[0].cpu()  # (H or 1, r, Tk)
            vis = vis[0] if vis.shape[0] == 1 else vis
        else:
            vis = torch.arange(sc.shape[-1]).view(1, -1) <= q_pos.view(-1, 1)
        parts.setdefault(ctx.layer, []).append(bulk_shares(sc[0].detach().cpu(), q_pos, vis, cfg))

    with hf.hooks(model, {"blocks.*.attn.scores": obs}), torch.no_grad():
        model(input_ids=ids, use_cache=False)
    stats: dict[str, list[Tensor]] = {}
    n = 0
    for layer in range(g.num_layers):
        rho_hat = torch.cat([p[0] for p in parts[layer]], 1)
        rho = torch.cat([p[1] for p in parts[layer]], 1)
        n = int((~rho[0].isnan()).sum())
        for k, v in summarize(rho_hat, rho, cfg.threshold).items():
            stats.setdefault(k, []).append(v)
    return LongContextHeads(**{k: torch.stack(v) for k, v in stats.items()}, queries=n, cfg=cfg)


__all__ = ["LongContextConfig", "LongContextHeads", "bulk_shares", "long_context_heads", "split_keys", "summarize"]
