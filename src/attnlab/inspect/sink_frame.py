"""Sink geometry: which reference frame a head's attention sink sets up (A130, "What are you sinking? A
geometric approach on attention sink").

A130 reads attention sinks as reference frames that anchor the representation space and names three types:
*centralized* (one anchor token), *distributed* (several anchor tokens share the role) and *bidirectional*
(anchors at both ends of the sequence, as in encoders). The abstract gives no formula, so the statistics
below are our operationalization (named conventions):

* **Received mass** ``m_j = mean_{i in R_j} A[i, j]`` over the query rows ``R_j`` that can see key ``j``
  (causal: ``i >= j``), skipping the first ``burn`` rows (default 4 in causal models: the first queries see
  almost only the first tokens). Only keys seen by at least ``min_rows`` rows count (default: a quarter of
  the rows ``i >= burn``; late keys in a causal model are seen by few, mostly local, queries, and would
  look like anchors through recency).
* **Anchors**: keys with ``m_j >= anchor`` (default 0.1: a tenth of every query's attention, against ``1/T``
  for uniform attention). ``frame_mass = sum_{anchors} m_j``.
* **Type** (per head): ``none`` when ``frame_mass < eps`` (0.3, the Sink^eps threshold of A262);
  ``bidirectional`` (encoders only: in a causal model the last keys are recency) when anchors sit at both
  ends (the first and the last ``ends`` positions) and each end holds at least ``0.2`` of ``frame_mass``; ``centralized`` when the top anchor holds at least ``central``
  (0.8) of ``frame_mass``; else ``distributed``. The model's type is the most common type among its heads
  that have a frame.
* **Geometry** of the top anchor's key ``k_a`` (post-RoPE, as the scores see it) against the other keys
  ``k_j`` and the queries ``q_i``: ``key_cos = cos(k_a, mean_j k_j)`` (non-anchor keys; a centralized frame
  puts the sink key away from the key cloud), ``key_norm_ratio = ||k_a|| / median_j ||k_j||``, and
  ``query_alignment = mean_i cos(q_i, k_a) - mean_{i, j} cos(q_i, k_j)`` (how much more the queries point
  at the anchor than at ordinary keys).

Reads ``blocks.{l}.attn.{q,k,weights}`` through the seam (the weights that produced the output).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf

TYPES = ("none", "centralized", "distributed", "bidirectional")


@dataclass(frozen=True)
class FrameConfig:
    """Thresholds of the reference-frame statistics (see the module docstring)."""

    burn: int | None = None  # query rows skipped; None: 4 for causal models, 0 for encoders
    anchor: float = 0.1  # received mass that makes a key an anchor
    eps: float = 0.3  # frame mass below which a head has no frame (A262's eps)
    central: float = 0.8  # top anchor's share of the frame mass for "centralized"
    ends: int = 1  # positions at each end for "bidirectional"
    min_rows: int | None = None  # a key counts only when this many rows see it; None: a quarter of the rows

    def __post_init__(self):
        for name in ("anchor", "eps", "central"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"FrameConfig.{name} must be in (0, 1], got {v}")
        if self.burn is not None and self.burn < 0:
            raise ValueError(f"FrameConfig.burn must be >= 0, got {self.burn}")
        if self.ends < 1 or (self.min_rows is not None and self.min_rows < 1):
            raise ValueError(f"FrameConfig.ends and min_rows must be >= 1, got {self.ends}, {self.min_rows}")


def received_mass(weights: Tensor, causal: bool, burn: int = 0, min_rows: int = 1) -> Tensor:
    """``weights (H, T, T)`` -> ``m (H, T)``: mean weight each key gets from the rows ``i >= burn`` that see it
    (causal: ``i >= j``); NaN for keys seen by fewer than ``min_rows`` such rows."""
    if weights.dim() != 3 or weights.shape[1] != weights.shape[2]:
        raise ValueError(f"weights must be (heads, T, T), got shape {tuple(weights.shape)}")
    T = weights.shape[-1]
    i = torch.arange(T).view(-1, 1)
    j = torch.arange(T).view(1, -1)
    sees = (i >= burn) & ((i >= j) if causal else torch.ones(T, T, dtype=torch.bool))
    n = sees.sum(0)  # (T,) rows per key
    m = (weights.double() * sees).sum(1) / n.clamp_min(1)
    return torch.where(n >= min_rows, m, torch.full_like(m, float("nan")))


def frame_type(m: Tensor, cfg: FrameConfig, causal: bool = True) -> tuple[str, list[int]]:
    """``m (T,)`` received mass of one head -> ``(type, anchors)`` (anchor positions, heaviest first).
    ``bidirectional`` needs a non-causal model (in a causal one the last keys are recency, not a frame)."""
    valid = ~m.isnan()
    idx = torch.nonzero(valid & (m >= cfg.anchor)).flatten()
    anchors = idx[m[idx].argsort(descending=True)].tolist()
    mass = float(m[anchors].sum()) if anchors else 0.0
    if mass < cfg.eps:
        return "none", anchors
    T = m.shape[0]
    last_valid = int(torch.nonzero(valid).max())
    first = sum(float(m[a]) for a in anchors if a < cfg.ends)
    last = sum(float(m[a]) for a in anchors if a > last_valid - cfg.ends)
    if not causal and T > 2 * cfg.ends and first >= 0.2 * mass and last >= 0.2 * mass:
        return "bidirectional", anchors
    if float(m[anchors[0]]) >= cfg.central * mass:
        return "centralized", anchors
    return "distributed", anchors


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)


def key_geometry(q: Tensor, k: Tensor, anchor: int, others: Tensor) -> dict[str, float]:
    """``q (T, D)``, ``k (T, D)`` of one head, the anchor position and the other keys' positions ->
    ``key_cos``, ``key_norm_ratio``, ``query_alignment`` (module docstring)."""
    q, k = q.double(), k.double()
    ka, ko = k[anchor], k[others]
    if ko.shape[0] == 0:
        return {"key_cos": float("nan"), "key_norm_ratio": float("nan"), "query_alignment": float("nan")}
    align = _cos(q, ka.expand_as(q)).mean() - _cos(q[:, None, :], ko[None, :, :]).mean()
    return {"key_cos": float(_cos(ka, ko.mean(0))),
            "key_norm_ratio": float(ka.norm() / ko.norm(dim=-1).median().clamp_min(1e-30)),
            "query_alignment": float(align)}


@dataclass(frozen=True)
class SinkFrames:
    """Per (layer, head) reference-frame statistics of one probe.

    Attributes:
        types: ``[L][H]`` frame type names (``TYPES``).
        anchors: ``[L][H]`` anchor positions, heaviest first.
        frame_mass, key_cos, key_norm_ratio, query_alignment: ``(L, H)`` (NaN where a head has no anchor).
    """

    types: list[list[str]]
    anchors: list[list[list[int]]]
    frame_mass: Tensor
    key_cos: Tensor
    key_norm_ratio: Tensor
    query_alignment: Tensor

    def counts(self) -> dict[str, int]:
        c = Counter(t for row in self.types for t in row)
        return {t: c.get(t, 0) for t in TYPES}

    def model_type(self) -> str:
        """The most common frame type among heads with a frame (``none`` when no head has one)."""
        c = self.counts()
        framed = {t: n for t, n in c.items() if t != "none" and n > 0}
        return max(framed, key=lambda t: (framed[t], -TYPES.index(t))) if framed else "none"

    def anchor_positions(self) -> dict[int, int]:
        """How many framed heads have each position as their top anchor."""
        c = Counter(a[0] for row_t, row_a in zip(self.types, self.anchors)
                    for t, a in zip(row_t, row_a) if t != "none" and a)
        return dict(sorted(c.items()))

    def per_layer(self) -> list[dict]:
        rows = []
        for layer, row in enumerate(self.types):
            c = Counter(row)
            rows.append({"layer": layer, **{t: c.get(t, 0) for t in TYPES},
                         "frame_mass": float(self.frame_mass[layer].mean()),
                         "key_cos": float(self.key_cos[layer].nanmean()),
                         "key_norm_ratio": float(self.key_norm_ratio[layer].nanmean()),
                         "query_alignment": float(self.query_alignment[layer].nanmean())})
        return rows

    def to_dict(self) -> dict:
        return {"types": self.types, "anchors": self.anchors, "frame_mass": self.frame_mass.tolist(),
                "key_cos": self.key_cos.tolist(), "key_norm_ratio": self.key_norm_ratio.tolist(),
                "query_alignment": self.query_alignment.tolist(), "counts": self.counts(),
                "model_type": self.model_type(), "anchor_positions": self.anchor_positions(),
                "per_layer": self.per_layer()}


def frames_from_tensors(weights: Tensor, q: Tensor, k: Tensor, causal: bool,
                        cfg: FrameConfig = FrameConfig()) -> tuple[list[str], list[list[int]], dict[str, Tensor]]:
    """One layer: ``weights (H, T, T)``, ``q (H, T, D)``, ``k (H, T, D)`` (k already per query head) ->
    per-head types, anchors and ``{frame_mass, key_cos, key_norm_ratio, query_alignment}`` ``(H,)``."""
    burn = cfg.burn if cfg.burn is not None else (4 if causal else 0)
    min_rows = cfg.min_rows if cfg.min_rows is not None else max(1, (weights.shape[-1] - burn) // 4)
    m = received_mass(weights, causal, burn, min_rows)
    H, T = m.shape
    stats = {n: torch.full((H,), float("nan"), dtype=torch.float64)
             for n in ("frame_mass", "key_cos", "key_norm_ratio", "query_alignment")}
    types, anchors = [], []
    for h in range(H):
        t, a = frame_type(m[h], cfg, causal)
        types.append(t)
        anchors.append(a)
        stats["frame_mass"][h] = float(m[h][a].sum()) if a else 0.0
        if a:
            others = torch.tensor([j for j in range(T) if j not in a], dtype=torch.long)
            for n, v in key_geometry(q[h, burn:], k[h], a[0], others).items():
                stats[n][h] = v
    return types, anchors, stats


def sink_frames(model: nn.Module, ids: Tensor, cfg: FrameConfig = FrameConfig()) -> SinkFrames:
    """Reference-frame statistics of every head of ``model`` on ``ids (1, T)``. Short probes only: the full
    ``H x T x T`` weights of every layer are kept; ``T`` must not exceed a sliding window."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one sequence (1, T), got shape {tuple(ids.shape)}")
    g = hf.geometry(model)
    T = ids.shape[1]
    window = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "sliding_window", None)
    if window is not None and getattr(model.config, "layer_types", None) is not None and T > window:
        raise ValueError(f"ids has {T} tokens, more than the model's sliding window {window}")
    _, cache = hf.run_with_cache(model, ids, ["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.weights"],
                                 rows=(0, T))
    types, anchors = [], []
    stats: dict[str, list[Tensor]] = {}
    for layer in range(g.num_layers):
        w = cache[f"blocks.{layer}.attn.weights"][0]
        q = cache[f"blocks.{layer}.attn.q"][0]
        k = cache[f"blocks.{layer}.attn.k"][0].repeat_interleave(g.group, 0)
        t, a, s = frames_from_tensors(w, q, k, g.is_causal, cfg)
        types.append(t)
        anchors.append(a)
        for n, v in s.items():
            stats.setdefault(n, []).append(v)
    return SinkFrames(types, anchors, **{n: torch.stack(v) for n, v in stats.items()})


__all__ = ["FrameConfig", "SinkFrames", "TYPES", "frame_type", "frames_from_tensors", "key_geometry",
           "received_mass", "sink_frames"]
