"""Per-head attention metrics, accumulated over query chunks (never the whole ``heads x T x T`` at once).

``HeadStats.update(w, q_pos, n_visible)`` takes one chunk of attention weights ``(heads, chunk, kv_len)`` and
adds its rows to running sums; ``finalize()`` returns one value per head for each metric. ``head_metrics``
runs the same code on a whole weight tensor, which is how the known-answer tests call it.

Definitions (``A[i, j]``: weight of query ``i`` on key ``j``; means are over query rows):

* ``sink``        -- mean attention to the first token, ``alpha = mean_i A[i, 0]`` over every query row (Gu et
  al., "When Attention Sink Emerges in Language Models: An Empirical View", A262: their importance score
  ``alpha_h^l[1]``, rows ``i >= 1`` of a causal model, i.e. all of them).
* ``is_sink``     -- 1.0 where ``sink > eps`` (``MetricConfig.eps``, the paper's 0.3), else 0.0: the per-head
  indicator of A262; ``sink_ratio`` averages it over layers and heads into the model's ``Sink^eps``.
* ``sink_rows``   -- share of query rows whose own first-token weight exceeds ``eps`` (a row-level view of the
  same threshold: a head with ``sink_rows`` near 1 sinks on every row, not just on average).
* ``entropy``     -- ``mean_i -sum_j A log A`` in nats; ``entropy_norm`` divides each row by ``log(visible)``.
* ``distance``    -- mean attention distance ``mean_i sum_j A |i - j|`` (in tokens).
* ``locality``    -- share within ``window``: ``sum_{|i-j| < window} A``, over rows that see more than
  ``sink_tokens + window`` keys (for shorter rows the question is trivial).
* ``streaming``   -- share on the first ``sink_tokens`` keys or within ``window`` (StreamingLLM / DuoAttention's
  sink + recent pattern), same rows as locality.
* ``prev_token``  -- mean ``A[i, i - 1]`` over ``i >= 1``.
* ``induction``   -- prefix-matching score (Olsson et al.): mass on keys ``j`` whose previous token equals the
  query's token (``tok[j-1] == tok[i]``, ``j <= i``), over rows that have such a key.
* ``lookback``    -- Lookback Lens ratio for rows ``i >= context_len`` (generated tokens): mean weight on the
  context over mean weight on context plus mean weight on the new tokens ``context_len..i``.
* ``profile``     -- positional profile: share of the context mass ``[1, context_len)`` falling in each of
  ``profile_bins`` equal position bins, for the query rows at the end (the question); ``basin`` = mean of
  the first and last bins over the mean of the middle ones (> 1: the U-shaped "attention basin").

Per row ``argmax`` (the most attended key) is kept for the retrieval score; pooled maps (at most
``map_bins`` x ``map_bins``) for the report; the head-averaged full map when ``kv_len <= rollout_max``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

HEAD_METRICS = (
    "sink", "is_sink", "sink_rows", "entropy", "entropy_norm", "distance", "locality", "streaming", "prev_token", "induction",
    "lookback", "basin",
)


@dataclass(frozen=True)
class MetricConfig:
    """Knobs of the metrics: sink threshold, window sizes, chunking and stored-map sizes."""

    eps: float = 0.3  # sink threshold (Gu et al.)
    sink_tokens: int = 4  # StreamingLLM's initial tokens
    window: int = 16  # locality / streaming window
    map_bins: int = 32  # stored attention maps are pooled to at most this many positions
    profile_bins: int = 8
    chunk: int = 256  # query rows per chunk
    rollout_max: int = 512  # keep head-averaged full maps (for rollout) up to this length

    def __post_init__(self):
        # eps is a threshold on a probability: outside [0, 1) no head (or every head) would be a sink
        if not 0.0 <= self.eps < 1.0:
            raise ValueError(f"MetricConfig.eps must be in [0, 1) (a share of attention), got {self.eps}")


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe adds to a plain prompt: tokens (for induction) and where the context ends."""

    tokens: tuple[int, ...] | None = None
    context_len: int | None = None  # lookback / profile: keys before it are the context
    profile_start: int | None = None  # first query row of the profile (default: context_len, or 90% of T)


class HeadStats:
    """Running per-head sums over query chunks of one layer, for one sequence of ``T`` keys."""

    def __init__(self, heads: int, T: int, cfg: MetricConfig, spec: ProbeSpec | None = None):
        self.H, self.T, self.cfg, self.spec = heads, T, cfg, spec or ProbeSpec()
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sums = {k: z(heads) for k in ("sink", "sink_rows", "entropy", "entropy_norm", "distance", "prev_token",
                                            "locality", "streaming", "induction", "lookback", "loc_all",
                                            "str_all")}
        self.counts = dict.fromkeys(("rows", "prev", "ind", "look", "prof"), 0)
        # rows counted per head: under a per-head plan each head sees its own number of keys
        self.head_counts = {k: torch.zeros(heads, dtype=torch.float64) for k in ("rows_norm", "loc")}
        self.argmax = torch.zeros(heads, T, dtype=torch.int32)
        self.maxw = torch.zeros(heads, T)
        self.nb = min(cfg.map_bins, T)
        self.map_sum = z(heads, self.nb, self.nb)
        self.map_cnt = z(self.nb)
        ctx = self.spec.context_len if self.spec.context_len is not None else T
        self.ctx = max(1, min(ctx, T))
        start = self.spec.profile_start
        if start is None:
            start = self.ctx if self.ctx < T else max(1, int(0.9 * T))
        self.prof_start = start
        self.pb = max(1, min(cfg.profile_bins, self.ctx - 1))
        self.prof = z(heads, self.pb)
        self.mean_map = torch.zeros(T, T) if T <= cfg.rollout_max else None
        self.tok = torch.tensor(self.spec.tokens) if self.spec.tokens is not None else None
        self.largest_chunk = 0  # numel of the largest weight chunk seen (memory check)

    def update(self, w: Tensor, q_pos: Tensor, n_visible: Tensor) -> None:
        """Add a chunk. w: ``(H, c, T)`` rows summing to 1 (or 0 if no key); q_pos ``(c,)``; n_visible: keys
        each row may see, ``(c,)`` (same for every head) or ``(H, c)`` (per head, e.g. under a plan)."""
        cfg, T = self.cfg, self.T
        w = w.float()
        H, c, Tk = w.shape
        assert Tk == T and H == self.H
        self.largest_chunk = max(self.largest_chunk, w.numel())
        kpos = torch.arange(T)
        qp = q_pos.view(c, 1)
        s = self.sums
        self.counts["rows"] += c
        s["sink"] += w[:, :, 0].sum(1).double()
        s["sink_rows"] += (w[:, :, 0] > cfg.eps).sum(1).double()
        ent = -(w * torch.log(w.clamp_min(1e-30))).sum(-1)  # (H, c)
        s["entropy"] += ent.sum(1).double()
        nv = n_visible.to(torch.float64).expand(H, c)
        many = nv > 1
        norm = ent.double() / torch.log(nv.clamp_min(2.0))
        s["entropy_norm"] += torch.where(many, norm, torch.zeros(())).sum(1)
        self.head_counts["rows_norm"] += many.sum(1)
        dist = (qp - kpos.view(1, T)).abs().float()  # (c, T)
        s["distance"] += (w * dist).sum(-1).sum(1).double()
        has_prev = q_pos >= 1
        if bool(has_prev.any()):
            rows = torch.nonzero(has_prev).squeeze(1)
            s["prev_token"] += w[:, rows, q_pos[rows] - 1].sum(1).double()
            self.counts["prev"] += len(rows)
        near = dist < cfg.window
        stream = near | (kpos.view(1, T) < cfg.sink_tokens)
        loc, strm = (w * near).sum(-1), (w * stream).sum(-1)  # (H, c)
        s["loc_all"] += loc.sum(1).double()
        s["str_all"] += strm.sum(1).double()
        hard = nv > cfg.sink_tokens + cfg.window  # (H, c)
        s["locality"] += (loc.double() * hard).sum(1)
        s["streaming"] += (strm.double() * hard).sum(1)
        self.head_counts["loc"] += hard.sum(1)
        if self.tok is not None:
            prev_tok = torch.cat([torch.full((1,), -1), self.tok[:-1]])  # tok[j-1], none for j = 0
            target = (prev_tok.view(1, T) == self.tok[q_pos].view(c, 1)) & (kpos.view(1, T) <= qp)
            target[:, 0] = False
            rows = target.any(1)
            if bool(rows.any()):
                s["induction"] += (w[:, rows] * target[rows]).sum(-1).sum(1).double()
                self.counts["ind"] += int(rows.sum())
        if self.ctx < T:
            rows = q_pos >= self.ctx
            if bool(rows.any()):
                wr, qr = w[:, rows], q_pos[rows]
                ctx_mean = wr[:, :, : self.ctx].sum(-1) / self.ctx
                new = (kpos.view(1, T) >= self.ctx) & (kpos.view(1, T) <= qr.view(-1, 1))
                new_mean = (wr * new).sum(-1) / (qr + 1 - self.ctx).float()
                ratio = ctx_mean / (ctx_mean + new_mean).clamp_min(1e-30)
                s["lookback"] += ratio.sum(1).double()
                self.counts["look"] += int(rows.sum())
        if self.ctx > 1:
            rows = q_pos >= self.prof_start
            if bool(rows.any()):
                wc = w[:, rows, 1 : self.ctx]  # (H, r, ctx - 1)
                kb = torch.arange(self.ctx - 1) * self.pb // (self.ctx - 1)
                binned = torch.zeros(H, wc.shape[1], self.pb).index_add_(2, kb, wc)
                tot = binned.sum(-1, keepdim=True)
                ok = tot.squeeze(-1) > 0
                share = torch.where(ok.unsqueeze(-1), binned / tot.clamp_min(1e-30), torch.zeros(()))
                self.prof += share.sum(1).double()
                self.counts["prof"] += int(rows.sum())
        mx, am = w.max(-1)
        self.argmax[:, q_pos] = am.to(torch.int32)
        self.maxw[:, q_pos] = mx
        kb = kpos * self.nb // T
        qb = q_pos * self.nb // T
        pooled = torch.zeros(H, c, self.nb).index_add_(2, kb, w)
        self.map_sum.index_add_(1, qb, pooled.double())
        self.map_cnt.index_add_(0, qb, torch.ones(c, dtype=torch.float64))
        if self.mean_map is not None:
            self.mean_map[q_pos] = w.mean(0)

    def finalize(self) -> dict[str, Tensor]:
        """Per-head values ``(H,)`` for each name in ``HEAD_METRICS`` (NaN where a metric does not apply)."""
        s, n, hc = self.sums, self.counts, self.head_counts
        nan = torch.full((self.H,), float("nan"), dtype=torch.float64)
        div = lambda x, k: x / n[k] if n[k] else nan.clone()  # noqa: E731
        out = {
            "sink": div(s["sink"], "rows"),
            "sink_rows": div(s["sink_rows"], "rows"),
            "entropy": div(s["entropy"], "rows"),
            "entropy_norm": torch.where(hc["rows_norm"] > 0, s["entropy_norm"] / hc["rows_norm"].clamp_min(1),
                                        nan),
            "distance": div(s["distance"], "rows"),
            "prev_token": div(s["prev_token"], "prev"),
            "induction": div(s["induction"], "ind"),
            "lookback": div(s["lookback"], "look"),
        }
        # a head whose rows are all short (or that sees few keys under a plan) falls back to all its rows
        has = hc["loc"] > 0
        for name, every in (("locality", "loc_all"), ("streaming", "str_all")):
            out[name] = torch.where(has, s[name] / hc["loc"].clamp_min(1), div(s[every], "rows"))
        out["is_sink"] = is_sink(out["sink"], self.cfg.eps)
        prof = self.profile()
        out["basin"] = basin_score(prof) if prof is not None else nan.clone()
        return out

    def profile(self) -> Tensor | None:
        """``(H, profile_bins)`` mean share of context mass per position bin, or None if no rows."""
        return self.prof / self.counts["prof"] if self.counts["prof"] else None

    def attention_map(self) -> Tensor:
        """``(H, nb, nb)`` pooled map: mean over the queries of a bin of the mass on each key bin."""
        return (self.map_sum / self.map_cnt.clamp_min(1).view(1, -1, 1)).float()


def check_weights(weights: Tensor) -> None:
    """Attention probabilities ``(..., Tk)``: finite, non-negative, rows summing to at most 1 (a masked or
    partial row may sum to less); raises ``ValueError`` naming what is wrong."""
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contain NaN or inf")
    if float(weights.min()) < -1e-6:
        raise ValueError(f"weights must be non-negative (attention probabilities), min is {float(weights.min()):.3g}")
    if float(weights.sum(-1).max()) > 1 + 1e-3:
        raise ValueError(f"attention rows must sum to at most 1, max row sum is {float(weights.sum(-1).max()):.4g}")


def is_sink(sink: Tensor, eps: float = 0.3) -> Tensor:
    """Per-head sink indicator of Gu et al. (A262): ``sink (...) -> (...)`` float64, 1.0 where the mean
    first-token weight exceeds ``eps``, 0.0 where it does not, NaN where ``sink`` is NaN (not measured)."""
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1) (a share of attention), got {eps}")
    sink = torch.as_tensor(sink)
    # compare in the input's own dtype: a float32 0.3 is "at", not above, eps = 0.3
    flags = (sink > eps).double()
    return torch.where(sink.isnan(), torch.full_like(flags, float("nan")), flags)


def sink_ratio(sink: Tensor, eps: float = 0.3) -> float:
    """The model-level ``Sink^eps`` of Gu et al. (A262): the share of heads whose mean first-token weight
    ``alpha = mean_i A[i, 0]`` exceeds ``eps``, ``(1/L) sum_l (1/H) sum_h 1[alpha_h^l > eps]``.

    ``sink``: per-head ``alpha``, ``(L, H)`` (or any shape; heads not measured, NaN, are left out). With the
    same number of heads per layer the mean over all heads equals the paper's mean of per-layer means.
    Returns a float in [0, 1].
    """
    flags = is_sink(sink, eps).flatten()
    flags = flags[~flags.isnan()]
    if flags.numel() == 0:
        raise ValueError("sink_ratio: no measured head (empty or all-NaN sink scores)")
    return float(flags.mean())


def basin_score(profile: Tensor) -> Tensor:
    """``(..., bins) -> (...)``: mean of the first and last bins over the mean of the middle bins (1 if flat)."""
    if profile.shape[-1] < 3:
        return torch.full(profile.shape[:-1], float("nan"), dtype=profile.dtype)
    ends = (profile[..., 0] + profile[..., -1]) / 2
    mid = profile[..., 1:-1].mean(-1)
    return ends / mid.clamp_min(1e-12)


def head_metrics(
    weights: Tensor, cfg: MetricConfig | None = None, spec: ProbeSpec | None = None, causal: bool = True,
    chunk: int | None = None, visible: Tensor | None = None,
) -> tuple[dict[str, Tensor], HeadStats]:
    """Metrics of full weights ``(H, Tq, T)`` (rows sum to 1), computed chunk by chunk as the recorder does.

    ``visible``: keys each row may see, ``(Tq,)`` or ``(H, Tq)`` (default: the causal or full rule).
    """
    cfg = cfg or MetricConfig()
    H, Tq, T = weights.shape
    stats = HeadStats(H, T, cfg, spec)
    chunk = chunk or cfg.chunk
    for r0 in range(0, Tq, chunk):
        rows = torch.arange(r0, min(Tq, r0 + chunk))
        q_pos = rows + (T - Tq)
        if visible is not None:
            vis = visible[..., rows]
        else:
            vis = q_pos + 1 if causal else torch.full_like(q_pos, T)
        stats.update(weights[:, rows], q_pos, vis)
    return stats.finalize(), stats


def retrieval_score(
    argmax: Tensor, answer_rows: Tensor, needle_pos: Tensor, tokens: Tensor, predicted: Tensor
) -> Tensor:
    """Retrieval score of Wu et al. ("Retrieval Head"), teacher-forced.

    A head copy-pastes at answer row ``i`` (a query whose next token is a needle token) when the model's
    top-1 prediction at ``i`` is that next token and the head's most-attended key is a needle position
    holding the same token. Score = copy-paste events / number of answer rows.

    Args: argmax ``(H, T)`` most-attended key per row; answer_rows ``(n,)`` rows whose next token is a needle
    token; needle_pos ``(m,)`` positions of the needle in the context; tokens ``(T + 1,)`` or ``(T,)`` ids with
    ``tokens[i + 1]`` the next token of row ``i``; predicted ``(T,)`` the model's top-1 next token per row.
    Returns ``(H,)``.
    """
    nxt = tokens[answer_rows + 1]
    ok_pred = predicted[answer_rows] == nxt  # (n,)
    att = argmax[:, answer_rows].long()  # (H, n)
    in_needle = torch.isin(att, needle_pos)
    same_tok = tokens[att] == nxt.view(1, -1)
    hits = (in_needle & same_tok & ok_pred.view(1, -1)).sum(1)
    return hits.double() / max(1, len(answer_rows))


def massive_activations(hidden: Tensor, min_abs: float = 100.0, ratio: float = 1000.0) -> dict[str, float]:
    """Sun et al.'s massive activations in one layer's hidden states ``(T, D)``.

    An activation is massive when ``|a| > min_abs`` and ``|a| > ratio * median(|h|)``. Returns the largest
    magnitude, its ratio to the median, its (token, dim) and how many activations qualify.
    """
    a = hidden.detach().float().abs()
    med = float(a.median())
    top = float(a.max())
    idx = int(a.argmax())
    tok, dim = divmod(idx, a.shape[1])
    count = int(((a > min_abs) & (a > ratio * med)).sum())
    return {"max_abs": top, "median_abs": med, "ratio": top / max(med, 1e-12), "token": tok, "dim": dim,
            "count": count}


def entropy_of_uniform(n: int) -> float:
    """Entropy of a uniform distribution over ``n`` keys (for readers checking entropy values)."""
    return math.log(n)
