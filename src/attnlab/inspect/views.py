"""Data for the interpretability views of the report (issue #16): every view is a small JSON-able dict.

* **Head view** (bertviz-style): for chosen heads, the query tokens and the key tokens in two columns joined
  by lines whose opacity is the attention weight. Long prompts are pooled before anything is embedded:
  ``pool_attention`` splits ``T`` tokens into ``B = min(blocks, T)`` contiguous bins (token ``i`` is in bin
  ``floor(i B / T)``, the atlas's rule) and keeps ``P[I, J] = mean_{i in I} sum_{j in J} A[i, j]`` (rows still
  sum to 1). Zoom regions are ``(query start, key start)`` squares of at most ``zoom`` tokens kept at full
  resolution. The embedded data is bounded by ``heads x (blocks^2 + zooms x zoom^2)`` per-mille integers plus
  ``blocks + 2 x zooms x zoom`` labels, whatever ``T`` is (see :func:`head_view_bytes_bound`).
* **Heatmaps**: patching (``CausalAnalysis.patch``), DLA, composition, and attention knockout
  (:func:`knockout_heatmap`: the change of a metric when every head of a layer stops attending one key from
  the metric's rows), each ``{"title", "matrix", "xlabels", "ylabels", "signed"}``.
* **Circuits** (Elhage et al. 2021, :mod:`.circuits`): per head the QK and OV singular values and the copying
  score; the Q/K/V composition matrices ``(L H, L H)`` (row: writer head, column: reader head).
* **Joint query-key embedding** (AttentionViz, A196): :func:`qk_embedding`. Convention (ours): centre the
  queries and the keys separately (subtracting the key mean shifts each query's scores by a constant, which
  the softmax ignores), scale queries by ``s`` and keys by ``1 / s`` with ``s = sqrt(mean|k_c| / mean|q_c|)``
  so both clouds have the same mean norm while every ``q . k`` product is unchanged, stack them ``(2T, D)`` and
  project onto the top two principal axes (SVD). The paper uses t-SNE / UMAP; PCA is deterministic and
  needs no dependency. Each axis's sign is fixed so that its largest loading is positive. Prompts longer than
  ``max_points`` are subsampled evenly (same positions for queries and keys).

``build_views(model, ids, labels, heads=...)`` records all of it in one forward pass on the hook seam
(``blocks.{l}.attn.weights`` chunks are pooled as they arrive, so an 8k-token prompt never holds ``T x T``
per head; ``blocks.{l}.attn.q`` / ``k`` for the embedding), so it also shows what a plan runs under
``hf.use``. ``write_view_pngs`` draws the matplotlib PNGs beside the page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import hf
from .atlas import _pooled_labels


@dataclass(frozen=True)
class ViewConfig:
    """Knobs of the views. ``blocks``: bins of the pooled head-view map; ``zoom``: side of a full-resolution
    zoom region (tokens); ``max_zooms``: zoom regions kept; ``max_heads``: heads in the head view;
    ``max_points``: tokens in the query-key embedding; ``decimals``: rounding of floats in the page."""

    blocks: int = 64
    zoom: int = 48
    max_zooms: int = 4
    max_heads: int = 6
    max_points: int = 512
    decimals: int = 4

    def __post_init__(self) -> None:
        for name in ("blocks", "zoom", "max_zooms", "max_heads", "max_points"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ViewConfig.{name} must be >= 1, got {getattr(self, name)}")


def head_view_bytes_bound(cfg: ViewConfig, n_heads: int, label_chars: int = 64) -> int:
    """Upper bound of the head view's JSON size: 5 bytes per per-mille integer (at most 4 digits and a comma),
    ``label_chars`` per label (each label is cut to 40 characters, escaped), 200 bytes per head and region."""
    cells = n_heads * (cfg.blocks ** 2 + cfg.max_zooms * cfg.zoom ** 2) + n_heads * (cfg.blocks + cfg.max_zooms * cfg.zoom)
    labels = cfg.blocks + 2 * cfg.max_zooms * cfg.zoom
    return 5 * cells + label_chars * labels + 200 * n_heads * (cfg.max_zooms + 1) + 1000


def _bins(T: int, B: int) -> Tensor:
    return (torch.arange(T) * B) // T


def pool_attention(w: Tensor, blocks: int) -> Tensor:
    """Pool attention ``w (..., T, T)`` into ``(..., B, B)``, ``B = min(blocks, T)``: mean over a bin's queries
    of the mass on each key bin (rows keep their sums)."""
    if w.dim() < 2 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"w must be (..., T, T), got {tuple(w.shape)}")
    T = w.shape[-1]
    B = min(int(blocks), T)
    if B < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    b = _bins(T, B).to(w.device)
    onehot = torch.nn.functional.one_hot(b, B).to(w.dtype)  # (T, B)
    summed = onehot.T @ w @ onehot  # (..., B, B): sum over a bin's queries of mass on each key bin
    return summed / onehot.sum(0).view(-1, 1)


def _cut(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


class HeadViewBuilder:
    """Accumulates the head view of chosen heads from chunks of attention rows (pooled sums and zoom rows).

    ``add(layer, w, row_start)``: ``w (H, r, Tk)`` weights of query rows ``row_start .. row_start + r`` of
    ``layer`` (every head of the layer; only the chosen ones are kept). ``result(labels)`` -> the view dict.
    """

    def __init__(self, T: int, heads: Sequence[tuple[int, int]], cfg: ViewConfig = ViewConfig(),
                 zooms: Sequence[tuple[int, int]] | None = None):
        if not heads:
            raise ValueError("heads must name at least one (layer, head)")
        if len(heads) > cfg.max_heads:
            raise ValueError(f"heads: at most ViewConfig.max_heads={cfg.max_heads} heads, got {len(heads)}")
        self.T, self.cfg, self.heads = int(T), cfg, [(int(a), int(b)) for a, b in heads]
        self.pooled = self.T > cfg.zoom
        self.B = min(cfg.blocks, self.T) if self.pooled else self.T
        self.bins = _bins(self.T, self.B)
        self.counts = torch.bincount(self.bins, minlength=self.B).double()
        Z = min(cfg.zoom, self.T)
        if zooms is None:  # the sink corner and the diagonal end, both seen from the last queries
            zooms = [(self.T - Z, 0), (self.T - Z, self.T - Z)] if self.pooled else []
        if len(zooms) > cfg.max_zooms:
            raise ValueError(f"zooms: at most ViewConfig.max_zooms={cfg.max_zooms} regions, got {len(zooms)}")
        self.zooms = []
        for q0, k0 in zooms:
            if not (0 <= q0 <= self.T - Z and 0 <= k0 <= self.T - Z):
                raise ValueError(f"zoom region ({q0}, {k0}) of side {Z} does not fit in {self.T} tokens")
            self.zooms.append((int(q0), int(k0), Z))
        self.sums = {hk: torch.zeros(self.B, self.B, dtype=torch.float64) for hk in self.heads}
        self.zoom_w = {hk: [torch.zeros(Z, Z, dtype=torch.float64) for _ in self.zooms] for hk in self.heads}
        self.rows_seen = {hk: 0 for hk in self.heads}

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def add(self, layer: int, w: Tensor, row_start: int) -> None:
        r, Tk = w.shape[1], w.shape[2]
        if Tk != self.T:
            raise ValueError(f"weights have {Tk} keys, the view was built for {self.T} tokens")
        rows = torch.arange(row_start, row_start + r)
        for (lay, h) in self.heads:
            if lay != layer:
                continue
            wh = w[h].detach().double().cpu()  # (r, T)
            keyb = torch.zeros(r, self.B, dtype=torch.float64).index_add_(1, self.bins, wh)  # (r, B)
            self.sums[(lay, h)].index_add_(0, self.bins[rows], keyb)
            self.rows_seen[(lay, h)] += r
            for zi, (q0, k0, Z) in enumerate(self.zooms):
                lo, hi = max(q0, row_start), min(q0 + Z, row_start + r)
                if lo < hi:
                    self.zoom_w[(lay, h)][zi][lo - q0:hi - q0] = wh[lo - row_start:hi - row_start, k0:k0 + Z]

    def result(self, labels: Sequence[str]) -> dict:
        if len(labels) != self.T:
            raise ValueError(f"labels: {len(labels)} labels for {self.T} tokens")
        for hk, n in self.rows_seen.items():
            if n != self.T:
                raise ValueError(f"head {hk}: saw {n} of {self.T} query rows (was its layer run?)")
        heads = []
        for hk in self.heads:
            P = self.sums[hk] / self.counts.view(-1, 1)
            heads.append({"layer": hk[0], "head": hk[1], "overview": _permille(P),
                          "zooms": [_permille(z) for z in self.zoom_w[hk]]})
        over = _pooled_labels(tuple(labels), self.B) if self.pooled else list(labels)
        return {"T": self.T, "pooled": self.pooled, "blocks": self.B,
                "rule": f"{self.T} tokens in {self.B} bins: token i in bin floor(i*{self.B}/{self.T}); "
                        "cell = mean over the bin's queries of the mass on the key bin",
                "labels": [_cut(s) for s in over],
                "zooms": [{"q": [q0, q0 + Z], "k": [k0, k0 + Z],
                           "qlabels": [_cut(s) for s in labels[q0:q0 + Z]],
                           "klabels": [_cut(s) for s in labels[k0:k0 + Z]]} for q0, k0, Z in self.zooms],
                "heads": heads}


def _permille(M: Tensor) -> list:
    return (M.double() * 1000).round().clamp(0, 1000).to(torch.int32).tolist()


def head_view(weights: Tensor, labels: Sequence[str], heads: Sequence[int], cfg: ViewConfig = ViewConfig(),
              zooms: Sequence[tuple[int, int]] | None = None, layer: int = 0, chunk: int = 256) -> dict:
    """The head view of ``heads`` of one layer from weights ``(H, T, T)`` (fed in row chunks, as the seam
    does)."""
    if weights.dim() != 3 or weights.shape[1] != weights.shape[2]:
        raise ValueError(f"weights must be (H, T, T), got {tuple(weights.shape)}")
    b = HeadViewBuilder(weights.shape[-1], [(layer, h) for h in heads], cfg, zooms)
    for s in range(0, weights.shape[1], chunk):
        b.add(layer, weights[:, s:s + chunk], s)
    return b.result(labels)


def qk_embedding(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Joint 2-D embedding of one head's queries ``q (T, D)`` and keys ``k (T, D)`` (module docstring).

    Returns ``(coords (2T, 2), explained (2,))``: rows ``0..T-1`` are the queries, ``T..2T-1`` the keys;
    ``explained`` is each axis's share of the total variance. float64.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be (T, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] < 2:
        raise ValueError(f"need at least 2 tokens, got {q.shape[0]}")
    qc = q.double() - q.double().mean(0)
    kc = k.double() - k.double().mean(0)
    nq, nk = float(qc.norm(dim=1).mean()), float(kc.norm(dim=1).mean())
    s = math.sqrt(nk / nq) if nq > 0 and nk > 0 else 1.0
    X = torch.cat([qc * s, kc / s])  # (2T, D), column means zero
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    V = Vh[:2].T.clone()  # (D, 2)
    if V.shape[1] < 2:
        V = torch.cat([V, torch.zeros(V.shape[0], 2 - V.shape[1], dtype=V.dtype)], 1)
    for c in range(V.shape[1]):
        if V[V[:, c].abs().argmax(), c] < 0:
            V[:, c] = -V[:, c]
    tot = float((S ** 2).sum())
    ex = (S[:2] ** 2 / tot) if tot > 0 else torch.zeros(min(2, len(S)), dtype=torch.float64)
    return X @ V, torch.cat([ex, torch.zeros(2 - len(ex), dtype=torch.float64)])


def _round(x: Any, d: int) -> Any:
    if isinstance(x, Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, d)
    if isinstance(x, list):
        return [_round(v, d) for v in x]
    return x


def qk_view(q: Tensor, k: Tensor, labels: Sequence[str], layer: int, head: int,
            cfg: ViewConfig = ViewConfig()) -> dict:
    """The AttentionViz view of one head: ``q, k (T, D)``; at most ``cfg.max_points`` positions, evenly."""
    T = q.shape[0]
    if len(labels) != T:
        raise ValueError(f"labels: {len(labels)} labels for {T} tokens")
    pos = torch.linspace(0, T - 1, min(T, cfg.max_points)).round().long().unique()
    xy, ex = qk_embedding(q[pos], k[pos])
    n = len(pos)
    return {"layer": layer, "head": head, "positions": pos.tolist(), "labels": [_cut(labels[i]) for i in pos],
            "q": _round(xy[:n], cfg.decimals), "k": _round(xy[n:], cfg.decimals),
            "explained": _round(ex, cfg.decimals),
            "convention": "PCA of centred queries and keys, scaled to equal mean norm (q.k unchanged)"}


def heatmap(title: str, M: Tensor, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
            signed: bool = False, decimals: int = 4, xname: str = "head", yname: str = "layer") -> dict:
    """A heatmap view ``(rows, cols)``: rows are ``ylabels`` (default ``L0..``), columns ``xlabels``."""
    if M.dim() != 2:
        raise ValueError(f"a heatmap needs a 2-D matrix, got {tuple(M.shape)}")
    R, C = M.shape
    return {"title": title, "matrix": _round(M.double(), decimals), "signed": bool(signed),
            "xlabels": [_cut(s) for s in (xlabels if xlabels is not None else [str(i) for i in range(C)])],
            "ylabels": [_cut(s) for s in (ylabels if ylabels is not None else [f"L{i}" for i in range(R)])],
            "xname": xname, "yname": yname}


def causal_heatmaps(a) -> dict[str, dict]:
    """Heatmaps of a :class:`~.causal_report.CausalAnalysis`: patching of ``z``, DLA, K-composition max-in."""
    out = {"patch_z": heatmap(f"{a.model} / {a.task}: activation patching of z (normalized effect)", a.patch,
                              signed=True),
           "dla": heatmap(f"{a.model} / {a.task}: direct logit attribution (clean run)", a.dla, signed=True)}
    if "k" in a.composition:
        out["k_comp"] = heatmap("K-composition: max over writer heads", a.composition["k"].flatten(0, 1).max(0).values)
    return out


def knockout_heatmap(model: nn.Module, ids: Tensor, metric: Callable[[Tensor], float], rows: Sequence[int],
                     keys: Sequence[int] | None = None, labels: Sequence[str] | None = None,
                     layers: Sequence[int] | None = None) -> dict:
    """``(layers, keys)`` attention-knockout effects: cell ``[l, j]`` is ``metric(knocked) - metric(clean)``
    when every head of layer ``l`` stops attending key ``j`` from the query ``rows`` (Geva et al. 2023;
    ``causal.attention_knockout``). ``keys`` defaults to every position; one forward pass per cell."""
    from .causal import attention_knockout

    with torch.no_grad():
        base = float(metric(model(input_ids=ids, use_cache=False).logits))  # once, not per cell
    T = ids.shape[1]
    g = hf.geometry(model)
    keys = list(range(T)) if keys is None else [int(j) for j in keys]
    layers = list(range(g.num_layers)) if layers is None else [int(x) for x in layers]
    M = torch.zeros(len(layers), len(keys), dtype=torch.float64)
    for a, layer in enumerate(layers):
        for b, j in enumerate(keys):
            M[a, b] = float(metric(attention_knockout(model, ids, [(layer, None, list(rows), [j])]))) - base
    xl = [labels[j] for j in keys] if labels is not None else [str(j) for j in keys]
    rs = sorted(int(r) for r in rows)
    where = f"row {rs[0]}" if len(rs) == 1 else f"{len(rs)} rows {rs[0]}..{rs[-1]}"
    return heatmap(f"attention knockout: metric change when a layer's heads stop reading a key from {where}",
                   M, xl, [f"L{x}" for x in layers], signed=True, xname="key", yname="layer")


def circuit_view(model: nn.Module, *, composition: bool = True, vocab: int | None = None,
                 decimals: int = 4) -> dict:
    """QK / OV singular values and copying score of every head, and the composition matrices
    ``(L H, L H)`` in per-mille integers (``composition=False``: skipped; their cost grows with layers^2)."""
    from .circuits import composition_scores, copying_scores, svd_spectra

    g = hf.geometry(model)
    sv = svd_spectra(model)
    out = {"num_layers": g.num_layers, "num_heads": g.num_heads, "qk_sv": _round(sv["qk"], decimals),
           "ov_sv": _round(sv["ov"], decimals), "copying": _round(copying_scores(model, vocab=vocab), decimals),
           "composition": {}}
    if composition:
        n = g.num_layers * g.num_heads
        for kind, S in composition_scores(model).items():
            out["composition"][kind] = _permille(S.reshape(n, n))  # scores lie in [0, 1]: compact integers
    return out


@dataclass(frozen=True)
class ReportViews:
    """The optional views of ``report.html`` (each a JSON-able dict, or None when not built)."""

    head_view: dict | None = None
    heatmaps: dict[str, dict] = field(default_factory=dict)
    circuits: dict | None = None
    qk: dict | None = None

    def to_dict(self) -> dict:
        return {"head_view": self.head_view, "heatmaps": self.heatmaps, "circuits": self.circuits, "qk": self.qk}

    def json_bytes(self) -> int:
        return len(json.dumps(self.to_dict(), separators=(",", ":")))


def build_views(model: nn.Module, ids: Tensor, labels: Sequence[str], heads: Sequence[tuple[int, int]], *,
                qk_head: tuple[int, int] | None = None, analysis=None, circuits: bool = True,
                composition: bool = True, knockout: dict | None = None, zooms=None,
                cfg: ViewConfig = ViewConfig()) -> ReportViews:
    """Record the views of ``model`` on ``ids (1, T)`` in one forward pass (module docstring).

    ``heads``: the head view's (layer, head) pairs; ``qk_head``: the embedded head (default ``heads[0]``);
    ``analysis``: a ``CausalAnalysis`` whose heatmaps join the page; ``knockout``: keyword arguments of
    :func:`knockout_heatmap` (``metric``, ``rows``, optional ``keys``, ``layers``); ``circuits``: the QK/OV view
    (weights only; needs separate q/k/v/o projections).
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be (1, T), got {tuple(ids.shape)}")
    T = ids.shape[1]
    if len(labels) != T:
        raise ValueError(f"labels: {len(labels)} labels for {T} tokens")
    g = hf.geometry(model)
    for layer, h in list(heads) + ([qk_head] if qk_head else []):
        if not (0 <= layer < g.num_layers and 0 <= h < g.num_heads):
            raise ValueError(f"head ({layer}, {h}) outside {g.num_layers} layers x {g.num_heads} heads")
    qk_head = tuple(qk_head) if qk_head is not None else tuple(heads[0])
    builder = HeadViewBuilder(T, heads, cfg, zooms)
    kept: dict[str, Tensor] = {}

    def weights(w: Tensor, ctx: Any) -> None:
        if w.shape[0] != 1:
            raise ValueError(f"the views analyse one sequence, got batch {w.shape[0]}")
        builder.add(ctx.layer, w[0], ctx.rows[0] + int(ctx.q_offset or 0))

    def keep(name: str):
        def fn(x: Tensor, ctx: Any) -> None:
            kept[name] = x.detach()
        return fn

    table: dict[str, Any] = {f"blocks.{layer}.attn.weights": weights for layer in builder.layers()}
    table[f"blocks.{qk_head[0]}.attn.q"] = keep("q")
    table[f"blocks.{qk_head[0]}.attn.k"] = keep("k")
    with torch.no_grad(), hf.hooks(model, table):
        model(input_ids=ids, use_cache=False)
    hv = builder.result(labels)
    q = kept["q"][0, qk_head[1]]
    k = kept["k"][0, qk_head[1] // (g.num_heads // g.num_kv_heads)]
    qk = qk_view(q, k, labels, qk_head[0], qk_head[1], cfg)
    maps = dict(causal_heatmaps(analysis)) if analysis is not None else {}
    if knockout is not None:
        maps["knockout"] = knockout_heatmap(model, ids, labels=labels, **knockout)
    circ = circuit_view(model, composition=composition, decimals=cfg.decimals) if circuits else None
    return ReportViews(hv, maps, circ, qk)


def write_view_pngs(views: ReportViews, out_dir: str | Path) -> list[Path]:
    """Matplotlib PNGs of every view: ``head_view.png``, ``heatmap_<name>.png``, ``circuits.png``,
    ``composition_<kind>.png``, ``qk_embedding.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.collections import LineCollection

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        paths.append(out / name)

    hv = views.head_view
    if hv is not None:
        n = len(hv["heads"])
        fig, axes = plt.subplots(1, n, figsize=(4.2 * n + 0.5, max(3.4, 0.09 * len(hv["labels"]) + 1)),
                                 squeeze=False)
        for ax, hd in zip(axes[0], hv["heads"]):
            W = np.array(hd["overview"]) / 1000
            B = len(W)
            ii, jj = np.nonzero(W > 0.01)  # bertviz-style lines: query i (left) -> key j (right), alpha = weight
            rgba = np.zeros((len(ii), 4))
            rgba[:, 2], rgba[:, 3] = 0.7, np.minimum(1, W[ii, jj])
            ax.add_collection(LineCollection([[(0, i), (1, j)] for i, j in zip(ii, jj)], colors=rgba, lw=0.8))
            ax.set_xlim(-0.1, 1.1)
            if B <= 64:  # token (or bin) labels on both sides; "$" escaped so mathtext leaves labels alone
                for i, lab in enumerate(hv["labels"]):
                    lab = lab[:14].replace("$", r"\$")
                    ax.text(-0.02, i, lab, ha="right", va="center", fontsize=5)
                    ax.text(1.02, i, lab, ha="left", va="center", fontsize=5)
            ax.set_ylim(B - 0.5, -0.5)
            ax.set_xticks([0, 1], ["query", "key"])
            ax.set_yticks([])
            ax.set_title(f"L{hd['layer']}.H{hd['head']}" + (f" ({B} bins)" if hv["pooled"] else ""), fontsize=9)
        save(fig, "head_view.png")
    for name, hm in views.heatmaps.items():
        M = np.array([[np.nan if v is None else v for v in r] for r in hm["matrix"]], dtype=float)
        fig, ax = plt.subplots(figsize=(max(3.0, 0.3 * M.shape[1] + 1.8), max(2.5, 0.22 * M.shape[0] + 1.2)))
        v = float(np.nanmax(np.abs(M))) if np.isfinite(M).any() else 1.0
        im = ax.imshow(M, cmap="RdBu_r" if hm["signed"] else "viridis", vmin=-v if hm["signed"] else None,
                       vmax=v if hm["signed"] else None, aspect="auto")
        ax.set_xlabel(hm["xname"])
        ax.set_ylabel(hm["yname"])
        ax.set_title(hm["title"], fontsize=8)
        fig.colorbar(im, ax=ax)
        save(fig, f"heatmap_{name}.png")
    c = views.circuits
    if c is not None:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
        for ax, key in zip(axes[:2], ("qk_sv", "ov_sv")):
            S = np.array(c[key], dtype=float)  # (L, H, r)
            ax.plot(S.reshape(-1, S.shape[-1]).T, color="C0", alpha=0.15)
            ax.set_yscale("log")
            ax.set_title(f"{key[:2].upper()} singular values (every head)", fontsize=9)
            ax.set_xlabel("index")
        cp = np.array([[np.nan if v is None else v for v in r] for r in c["copying"]], dtype=float)
        im = axes[2].imshow(cp, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        axes[2].set_title("copying score", fontsize=9)
        axes[2].set_xlabel("head")
        axes[2].set_ylabel("layer")
        fig.colorbar(im, ax=axes[2])
        save(fig, "circuits.png")
        for kind, S in c["composition"].items():
            fig, ax = plt.subplots(figsize=(5, 4.4))
            im = ax.imshow(np.array(S, dtype=float) / 1000, cmap="viridis", aspect="auto")
            ax.set_xlabel("reader head (layer * H + head)")
            ax.set_ylabel("writer head")
            ax.set_title(f"{kind.upper()}-composition", fontsize=9)
            fig.colorbar(im, ax=ax)
            save(fig, f"composition_{kind}.png")
    if views.qk is not None:
        q, k = np.array(views.qk["q"], dtype=float), np.array(views.qk["k"], dtype=float)
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(q[:, 0], q[:, 1], s=8, c="#1f77b4", label="queries")
        ax.scatter(k[:, 0], k[:, 1], s=8, c="#d62728", label="keys")
        ax.set_title(f"joint q/k PCA, L{views.qk['layer']}.H{views.qk['head']}", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, "qk_embedding.png")
    return paths


__all__ = ["HeadViewBuilder", "ReportViews", "ViewConfig", "build_views", "causal_heatmaps", "circuit_view",
           "head_view", "head_view_bytes_bound", "heatmap", "knockout_heatmap", "pool_attention", "qk_embedding",
           "qk_view", "write_view_pngs"]
