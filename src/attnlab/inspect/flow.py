"""Attention rollout and attention flow (Abnar & Zuidema, "Quantifying Attention Flow in Transformers").

Both start from the head-averaged attention of each layer with the residual connection folded in:
``Â_l = r I + (1 - r) A_l`` (``r = 0.5`` in the paper), rows renormalized.

* rollout: ``R = Â_L ... Â_1``; ``R[i, j]`` is how much input token ``j`` reaches output position ``i``.
* flow: the layers form a graph whose node ``(l, i)`` is position ``i`` after layer ``l``; the edge from
  ``(l - 1, j)`` to ``(l, i)`` has capacity ``Â_l[i, j]``. The flow of input ``j`` to output ``t`` is the
  maximum flow from ``(0, j)`` to ``(L, t)``. Implemented here with Dinic's algorithm on float capacities
  (no extra dependency); it is a small-length tool (the graph has ``(L + 1) T`` nodes).

Both work for causal models: a causal ``A_l`` is lower triangular, so nothing flows from later tokens.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


def with_residual(maps: Tensor, residual: float = 0.5) -> Tensor:
    """``(L, T, T) -> (L, T, T)``: ``r I + (1 - r) A`` with rows renormalized."""
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype)
    a = residual * eye + (1 - residual) * maps
    return a / a.sum(-1, keepdim=True).clamp_min(1e-30)


def rollout(maps: Tensor, residual: float = 0.5) -> Tensor:
    """Attention rollout ``(T, T)`` from head-averaged maps ``(L, T, T)`` (layer 0 first)."""
    a = with_residual(maps.double(), residual)
    r = torch.eye(maps.shape[-1], dtype=torch.float64)
    for layer in a:
        r = layer @ r
    return r


class MaxFlow:
    """Dinic's maximum flow on a directed graph with float capacities."""

    def __init__(self, n: int):
        self.n = n
        self.graph: list[list[int]] = [[] for _ in range(n)]
        self.to: list[int] = []
        self.cap: list[float] = []

    def add_edge(self, u: int, v: int, c: float) -> None:
        self.graph[u].append(len(self.to))
        self.to.append(v)
        self.cap.append(float(c))
        self.graph[v].append(len(self.to))
        self.to.append(u)
        self.cap.append(0.0)

    def max_flow(self, s: int, t: int, tol: float = 1e-12) -> float:
        """Value of the maximum ``s -> t`` flow (capacities are consumed: build a fresh graph per query)."""
        total = 0.0
        while True:
            level = [-1] * self.n
            level[s] = 0
            dq = deque([s])
            while dq:
                u = dq.popleft()
                for e in self.graph[u]:
                    if self.cap[e] > tol and level[self.to[e]] < 0:
                        level[self.to[e]] = level[u] + 1
                        dq.append(self.to[e])
            if level[t] < 0:
                return total
            it = [0] * self.n
            while True:
                f = self._dfs(s, t, float("inf"), level, it, tol)
                if f <= tol:
                    break
                total += f

    def _dfs(self, u, t, f, level, it, tol):
        if u == t:
            return f
        while it[u] < len(self.graph[u]):
            e = self.graph[u][it[u]]
            v = self.to[e]
            if self.cap[e] > tol and level[v] == level[u] + 1:
                d = self._dfs(v, t, min(f, self.cap[e]), level, it, tol)
                if d > tol:
                    self.cap[e] -= d
                    self.cap[e ^ 1] += d
                    return d
            it[u] += 1
        return 0.0


def attention_flow(maps: Tensor, target: int, residual: float = 0.5) -> Tensor:
    """Flow ``(T,)`` from each input token to output position ``target``; maps ``(L, T, T)`` head-averaged."""
    a = with_residual(maps.double(), residual)
    L, T, _ = a.shape
    out = torch.zeros(T, dtype=torch.float64)
    for j in range(T):
        g = MaxFlow((L + 1) * T)
        for layer in range(L):
            for i in range(T):
                for k in range(T):
                    c = float(a[layer, i, k])
                    if c > 0:
                        g.add_edge(layer * T + k, (layer + 1) * T + i, c)
        out[j] = g.max_flow(j, L * T + target)
    return out
