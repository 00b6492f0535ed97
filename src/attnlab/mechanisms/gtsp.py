"""GTSP [D66]: sparsifying a graph transformer along four axes -- input nodes, attention heads, layers, weights.

Setting: a small graph transformer (:class:`GraphTransformer`) over a generated graph's nodes: dense attention
with a learned per-head bias on adjacent pairs, pre-norm blocks, mean-pooled readout, graph classification
(:func:`make_graphs`: label = whether the graph has at least ``edges_needed`` edges between "marked" nodes).

The wrapper (:class:`GTSP`) puts a differentiable mask on each compressible component, trained end-to-end with
the task loss plus a sparsity penalty, then hard-pruned at a target keep ratio per component:

* nodes: a scorer ``s_i = w . x_i`` per node; gate ``sigmoid(s_i / tau)`` (training: plus logistic noise, a
  binary Gumbel relaxation); a gated node contributes its features scaled by the gate and its keys get
  ``log(gate)`` added to their scores, so gate 0 = the node is absent; pruning keeps each graph's top nodes;
* heads: one logit per (layer, head); gate multiplies the head's output ``z`` before the output projection;
* layers: one logit per layer; gate multiplies both residual branches of the block (gate 0 = identity);
* weights: one logit per entry of each projection / feed-forward matrix; gate multiplies the weight.

Objective: ``L = CE + lam * sum_kind mean(gate_kind)`` (expected kept fraction per kind). Pruning keeps the
``round(ratio * n)`` highest logits of each kind (nodes: per graph, by score). What the paper does per component
(read from its method section): Gumbel-softmax top-k token selection, head importance from gradients of the loss
w.r.t. head masks, stochastic layer dropping, gradual magnitude pruning with regrowth for weights. Our deviation:
one sigmoid-gate parameterisation and one L1 objective for all four kinds (so the four can be trained jointly and
tested alike); :func:`head_importance` gives the paper's gradient score for heads as an alternative ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.checks import positive_int

KINDS = ("nodes", "heads", "layers", "weights")


# ---- task ----------------------------------------------------------------------------------------------------


def make_graphs(n: int, nodes: int = 12, p_edge: float = 0.3, p_mark: float = 0.4, edges_needed: int = 2,
                feat: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(x (n, nodes, feat), adj (n, nodes, nodes) bool symmetric, y (n,) long). Feature 0 marks a node; the rest
    is noise; label 1 when at least ``edges_needed`` edges join two marked nodes."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, nodes, nodes, generator=g) < p_edge
    adj = torch.triu(a, 1)
    adj = adj | adj.transpose(1, 2)
    mark = torch.rand(n, nodes, generator=g) < p_mark
    x = torch.randn(n, nodes, feat, generator=g) * 0.5
    x[..., 0] = mark.float() * 2 - 1
    both = (adj & mark.unsqueeze(1) & mark.unsqueeze(2)).sum((1, 2)) // 2
    return x, adj, (both >= edges_needed).long()


# ---- model with four mask kinds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GTConfig:
    feat: int = 8
    dim: int = 32
    heads: int = 4
    layers: int = 3
    classes: int = 2
    tau: float = 0.5  # node gate temperature

    def __post_init__(self) -> None:
        for name in ("feat", "dim", "heads", "layers", "classes"):
            positive_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of heads ({self.heads})")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")


class MaskedLinear(nn.Module):
    """A linear map whose weight is multiplied by ``gate`` (same shape) when given."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        w = self.lin.weight if gate is None else self.lin.weight * gate
        return F.linear(x, w, self.lin.bias)


class Block(nn.Module):
    def __init__(self, c: GTConfig) -> None:
        super().__init__()
        self.c = c
        self.n1, self.n2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.q, self.k, self.v, self.o = (MaskedLinear(c.dim, c.dim) for _ in range(4))
        self.f1, self.f2 = MaskedLinear(c.dim, 4 * c.dim), MaskedLinear(4 * c.dim, c.dim)
        self.adj_bias = nn.Parameter(torch.zeros(c.heads))

    def forward(self, x: Tensor, adj: Tensor, key_logmask: Tensor, head_gate: Tensor | None, layer_gate: Tensor | None,
                wg: dict[str, Tensor] | None, heads: list[int] | None = None) -> Tensor:
        """x (B, N, dim), adj (B, N, N) bool, key_logmask (B, N) added to every score on that key.

        ``heads``: the heads this block still has (pruned heads removed by slicing the weights); None = all."""
        B, N, _ = x.shape
        hd = self.c.dim // self.c.heads
        hs = list(range(self.c.heads)) if heads is None else heads
        cols = torch.tensor([h * hd + i for h in hs for i in range(hd)], dtype=torch.long)
        g = wg or {}

        def proj(m: MaskedLinear, name: str, y: Tensor) -> Tensor:  # only the kept heads' rows
            w = m.lin.weight if name not in g else m.lin.weight * g[name]
            return F.linear(y, w[cols], m.lin.bias[cols]).view(B, N, len(hs), hd).transpose(1, 2)

        h = self.n1(x)
        q, k, v = proj(self.q, "q", h), proj(self.k, "k", h), proj(self.v, "v", h)
        bias = self.adj_bias[hs].view(1, -1, 1, 1) * adj.unsqueeze(1) + key_logmask.view(B, 1, 1, N)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, Hk, N, hd)
        if head_gate is not None:
            z = z * head_gate[hs].view(1, -1, 1, 1)
        wo = self.o.lin.weight if "o" not in g else self.o.lin.weight * g["o"]
        a = F.linear(z.transpose(1, 2).reshape(B, N, len(hs) * hd), wo[:, cols], self.o.lin.bias)
        lg = 1.0 if layer_gate is None else layer_gate
        x = x + lg * a
        return x + lg * self.f2(F.gelu(self.f1(self.n2(x), g.get("f1"))), g.get("f2"))


WEIGHTS = ("q", "k", "v", "o", "f1", "f2")


class GraphTransformer(nn.Module):
    def __init__(self, c: GTConfig) -> None:
        super().__init__()
        self.c = c
        self.inp = nn.Linear(c.feat, c.dim)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.classes)

    def forward(self, x: Tensor, adj: Tensor, node_gate: Tensor | None = None, head_gate: Tensor | None = None,
                layer_gate: Tensor | None = None, weight_gate: list[dict[str, Tensor]] | None = None,
                layers: list[int] | None = None, heads: list[list[int]] | None = None) -> Tensor:
        """x (B, N, feat), adj (B, N, N) -> logits (B, classes). Gates: node (B, N), head (L, H), layer (L,),
        weight: per layer a dict of gates shaped like the weights. ``layers`` / ``heads``: structures kept after
        removal (None = all)."""
        B, N, _ = x.shape
        ng = torch.ones(B, N, dtype=x.dtype) if node_gate is None else node_gate
        h = self.inp(x) * ng.unsqueeze(-1)
        logm = torch.log(ng.clamp_min(1e-30)).masked_fill(ng == 0, float("-inf"))
        for i in range(self.c.layers) if layers is None else layers:
            h = self.blocks[i](h, adj, logm, None if head_gate is None else head_gate[i],
                               None if layer_gate is None else layer_gate[i],
                               None if weight_gate is None else weight_gate[i],
                               None if heads is None else heads[i])
        pooled = (self.norm(h) * ng.unsqueeze(-1)).sum(1) / ng.sum(1, keepdim=True).clamp_min(1e-9)
        return self.head(pooled)


class GTSP(nn.Module):
    """The four mask kinds around a :class:`GraphTransformer` (logits; gates = sigmoid)."""

    def __init__(self, model: GraphTransformer, init: float = 3.0) -> None:
        super().__init__()
        c = model.c
        self.model = model
        self.node_scorer = nn.Linear(c.feat, 1)
        nn.init.zeros_(self.node_scorer.weight)
        nn.init.constant_(self.node_scorer.bias, init * c.tau)
        self.head_logits = nn.Parameter(torch.full((c.layers, c.heads), init))
        self.layer_logits = nn.Parameter(torch.full((c.layers,), init))
        self.weight_logits = nn.ParameterList(
            nn.ParameterDict({n: nn.Parameter(torch.full_like(getattr(b, n).lin.weight, init)) for n in WEIGHTS})
            for b in model.blocks)
        self.hard: dict[str, Tensor] | None = None  # set by prune()

    def node_logits(self, x: Tensor) -> Tensor:
        return self.node_scorer(x).squeeze(-1) / self.model.c.tau

    def gates(self, x: Tensor, noise: bool = False) -> dict:
        """Soft gates (training) or, after :meth:`prune`, the hard 0/1 masks (nodes recomputed per graph)."""
        if self.hard is not None:
            return {"nodes": self._hard_nodes(x), "heads": self.hard["heads"], "layers": self.hard["layers"],
                    "weights": self.hard["weights"]}
        s = self.node_logits(x)
        if noise:
            u = torch.rand_like(s).clamp(1e-6, 1 - 1e-6)
            s = s + torch.log(u) - torch.log1p(-u)  # logistic noise: binary Gumbel relaxation
        return {"nodes": torch.sigmoid(s), "heads": torch.sigmoid(self.head_logits),
                "layers": torch.sigmoid(self.layer_logits),
                "weights": [{n: torch.sigmoid(p) for n, p in d.items()} for d in self.weight_logits]}

    def forward(self, x: Tensor, adj: Tensor, noise: bool = False) -> tuple[Tensor, Tensor]:
        """(logits (B, classes), sparsity penalty = sum over kinds of the mean gate)."""
        g = self.gates(x, noise)
        out = self.model(x, adj, g["nodes"], g["heads"], g["layers"], g["weights"])
        wmean = torch.cat([t.flatten() for d in g["weights"] for t in d.values()]).mean()
        pen = g["nodes"].mean() + g["heads"].mean() + g["layers"].mean() + wmean
        return out, pen

    # ---- pruning ----
    def prune(self, ratios: dict[str, float]) -> None:
        """Hard masks keeping ``round(ratio * n)`` highest logits per kind (at least one head per kept layer,
        one layer, one node); kinds not named keep everything."""
        for kind, r in ratios.items():
            if kind not in KINDS:
                raise ValueError(f"ratios: unknown kind {kind!r}; kinds are {KINDS}")
            if not 0.0 < r <= 1.0:
                raise ValueError(f"ratios[{kind!r}] must be in (0, 1], got {r}")
        self.ratios = {k: float(ratios.get(k, 1.0)) for k in KINDS}
        with torch.no_grad():
            heads = _top_mask(self.head_logits.flatten(), self.ratios["heads"]).view_as(self.head_logits)
            flat = torch.cat([p.flatten() for d in self.weight_logits for p in d.values()])
            keep = _top_mask(flat, self.ratios["weights"])
            weights, i = [], 0
            for d in self.weight_logits:
                weights.append({})
                for n, p in d.items():
                    weights[-1][n] = keep[i:i + p.numel()].view_as(p).float()
                    i += p.numel()
            self.hard = {"heads": heads.float(), "layers": _top_mask(self.layer_logits, self.ratios["layers"]).float(),
                         "weights": weights}

    def _hard_nodes(self, x: Tensor) -> Tensor:
        s = self.node_logits(x)
        return torch.stack([_top_mask(r, self.ratios["nodes"]) for r in s]).to(x.dtype)


def _top_mask(logits: Tensor, ratio: float) -> Tensor:
    n = logits.numel()
    k = max(1, min(n, round(ratio * n)))
    return torch.zeros(n, dtype=torch.bool).scatter_(0, logits.flatten().topk(k).indices, True).view_as(logits)


def head_importance(wrapper: GTSP, x: Tensor, adj: Tensor, y: Tensor) -> Tensor:
    """The paper's head score: ``|dL/dm_h|`` at head masks ``m = 1`` (L, H)."""
    m = torch.ones_like(wrapper.head_logits, requires_grad=True)
    loss = F.cross_entropy(wrapper.model(x, adj, head_gate=m), y)
    (g,) = torch.autograd.grad(loss, m)
    return g.abs()


# ---- cost and training -----------------------------------------------------------------------------------------


def flops(c: GTConfig, nodes: float, heads_per_layer: list[float], layers: list[int], weight_density: float) -> float:
    """Forward multiply-adds x2 of the kept model on a graph of ``nodes`` kept nodes: per kept layer, q/k/v/o
    projections over the kept heads' columns and the feed-forward (both scaled by the kept weight density), and
    the scores + weighted sum over the kept heads."""
    hd = c.dim // c.heads
    total = 2 * nodes * c.feat * c.dim
    for i in layers:
        hk = heads_per_layer[i]
        total += weight_density * (2 * nodes * c.dim * hk * hd * 4 + 2 * nodes * c.dim * 4 * c.dim * 2)
        total += 2 * 2 * nodes * nodes * hk * hd
    return total


def kept_flops(wrapper: GTSP, x: Tensor) -> float:
    """FLOPs of the pruned model / FLOPs of the full model, averaged over the graphs of ``x``."""
    c = wrapper.model.c
    full = flops(c, x.shape[1], [c.heads] * c.layers, list(range(c.layers)), 1.0)
    g = wrapper.gates(x)
    layers = [i for i in range(c.layers) if g["layers"][i] > 0]
    heads = [float(g["heads"][i].sum()) for i in range(c.layers)]
    wd = float(torch.cat([t.flatten() for d in g["weights"] for t in d.values()]).mean())
    nodes = float(g["nodes"].sum(1).mean())
    return flops(c, nodes, heads, layers, wd) / full


def train(wrapper: GTSP, x: Tensor, adj: Tensor, y: Tensor, steps: int = 200, lam: float = 0.0, lr: float = 3e-3,
          batch: int = 64, seed: int = 0) -> list[float]:
    """Adam on CE + lam * penalty (noisy node gates); returns the loss per step."""
    torch.manual_seed(seed)
    params = [p for n, p in wrapper.named_parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,))
        out, pen = wrapper(x[idx], adj[idx], noise=True)
        loss = F.cross_entropy(out, y[idx]) + lam * pen
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def accuracy(wrapper: GTSP, x: Tensor, adj: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        out, _ = wrapper(x, adj)
    return float((out.argmax(-1) == y).float().mean())


def table(ratios=(1.0, 0.75, 0.5), steps: int = 300, lam: float = 0.05, seed: int = 0) -> list[dict]:
    """Train dense (``lam=0``) then with the penalty, prune every kind at each ratio (no fine-tuning), report
    FLOPs kept and test accuracy."""
    x, adj, y = make_graphs(2000, seed=seed)
    xt, adjt, yt = make_graphs(1000, seed=seed + 1)
    torch.manual_seed(seed)
    w = GTSP(GraphTransformer(GTConfig()))
    train(w, x, adj, y, steps=steps, seed=seed)
    train(w, x, adj, y, steps=steps // 2, lam=lam, seed=seed + 1)
    rows = [{"ratio": "soft gates", "flops_kept": math.nan, "accuracy": accuracy(w, xt, adjt, yt)}]
    for r in ratios:
        w.prune({k: r for k in KINDS})
        rows.append({"ratio": r, "flops_kept": kept_flops(w, xt), "accuracy": accuracy(w, xt, adjt, yt)})
        w.hard = None
    rows.append({"ratio": "majority class", "flops_kept": 0.0, "accuracy": float(max(yt.float().mean(),
                                                                                       1 - yt.float().mean()))})
    return rows


__all__ = ["GTSP", "GTConfig", "GraphTransformer", "KINDS", "accuracy", "flops", "head_importance", "kept_flops",
           "make_graphs", "table", "train"]
