"""Sparse Attention Decomposition (A168, Franco & Crovella, "Sparse Attention Decomposition Applied to Circuit
Tracing").

A head's score of query token ``i`` on key token ``j`` is a bilinear form of the two tokens' (normalized)
residual vectors ``x_i, x_j (d,)``: ``s_ij = scale * x_i^T M x_j`` with ``M = W_Q^T R_{j-i} W_K`` (column
convention as in :mod:`attnlab.inspect.circuits`; ``R_delta`` is RoPE's rotation by the relative distance).
With the SVD ``M = sum_k sigma_k u_k v_k^T`` (rank <= head_dim) the score splits over singular directions,

    s_ij = sum_k c_k,   c_k = scale * sigma_k (u_k . x_i) (v_k . x_j),

and A168's observation is that a few ``k`` carry the score of the attended pairs (sparse). Because ``x_j`` is
the input RMSNorm of the residual stream, ``x_j = g * r_j / rms_j`` and ``r_j = embed_j + sum_{heads A of
earlier layers} o_A(j) + sum_{earlier MLPs} m(j)``, each direction's key-side signal ``v_k . x_j`` splits
exactly over the upstream writers (``(v_k * g) . part_j / rms_j``), and likewise the query side through ``u_k``:
that names the heads that write the directions the head reads (the communication paths).

Conventions (ours, named):

* ``rope="relative"`` (default for RoPE models): ``M`` includes ``R_{j-i}``, one ``D x D`` SVD per traced pair;
  the terms then sum exactly to the model's score. ``rope="ignore"``: the weights-only ``W_QK`` of
  :func:`attnlab.inspect.circuits.qk_circuit` for every pair (what the literature does; the terms then sum to
  the RoPE-free score).
* Each query row ``i`` is traced at its most attended key ``j* = argmax_j A_ij`` (``keys="top"``), or at a
  given key position (``keys=int``, e.g. a sink or an induction target).
* ``n_sparse(i)``: the smallest number of directions whose ``|c_k|`` hold ``mass`` (0.9) of ``sum_k |c_k|``.
* ``through_top``: an upstream part's contribution to the score through the row's top ``top`` directions (by
  ``|c_k|``); ``through_all``: through every direction (its direct-path share of the whole score). Both sum,
  over all parts, to the corresponding score exactly.

Supported: pre-norm decoders with separate, bias-free q/k projections and no q/k norm (Llama, SmolLM2,
Mistral); Gemma 3 and Qwen2 raise (their q/k norms and biases make the score non-bilinear in ``x``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf
from .causal import _base, _check_ids, _head_outputs, _trace, rms_gain
from .circuits import _weights
from .rope_usage import inv_freqs


def _check_model(model: nn.Module, layer: int, head: int) -> nn.Module:
    g = hf.geometry(model)
    if not 0 <= layer < g.num_layers:
        raise ValueError(f"layer {layer} outside 0..{g.num_layers - 1}")
    if not 0 <= head < g.num_heads:
        raise ValueError(f"head {head} outside 0..{g.num_heads - 1}")
    attn = dict(hf.attention_modules(model))[layer]
    if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
        raise ValueError(f"{type(attn).__name__} normalizes q/k per head: the score is not bilinear in the "
                         "residual stream (Gemma 3, Qwen3); SAD supports Llama-style layers")
    for name in ("q_proj", "k_proj"):
        if getattr(getattr(attn, name), "bias", None) is not None:
            raise ValueError(f"{type(attn).__name__}.{name} has a bias: the score is not bilinear (Qwen2)")
    layer_mod = _base(model).layers[layer]
    if hasattr(layer_mod, "pre_feedforward_layernorm"):
        raise ValueError("sandwich-norm layers (Gemma) are not supported")
    return attn


def rotate(w: Tensor, delta: int | Tensor, inv_freq: Tensor) -> Tensor:
    """``R_delta w`` for ``w (D, n)`` (rows are head dims): RoPE's rotation of each rotate-half pair
    ``(f, f + D/2)`` by ``delta * inv_freq[f]``."""
    F = w.shape[0] // 2
    ang = float(delta) * inv_freq.double()
    c, s = ang.cos().view(F, 1), ang.sin().view(F, 1)
    a, b = w[:F], w[F:]
    return torch.cat([a * c - b * s, b * c + a * s], 0)


def factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of ``left @ right`` (``left (d, r)``, ``right (r, d)``) from the ``r x r`` core: ``U (d, r)``,
    ``S (r,)``, ``V (d, r)`` with ``left @ right = U diag(S) V^T``."""
    qa, ra = torch.linalg.qr(left)
    qb, rb = torch.linalg.qr(right.T)
    uc, s, vch = torch.linalg.svd(ra @ rb.T)
    return qa @ uc, s, qb @ vch.T


def n_sparse(terms: Tensor, mass: float = 0.9) -> Tensor:
    """``terms (..., K)`` -> ``(...)``: fewest terms whose ``|c|`` hold ``mass`` of ``sum |c|``."""
    a = terms.abs().sort(-1, descending=True).values
    cum = a.cumsum(-1)
    return (cum < mass * cum[..., -1:]).sum(-1) + 1


@dataclass(frozen=True)
class SADResult:
    """Sparse attention decomposition of one head on one sequence.

    Attributes:
        rows: ``(r,)`` traced query positions; keys: ``(r,)`` their key positions.
        scores: ``(r,)`` the scores ``s_ij`` from the decomposition (equal to the model's, ``rope="relative"``).
        terms: ``(r, K)`` ``c_k`` per direction, directions in descending ``sigma``.
        sigma: ``(r, K)`` singular values used for each row.
        n_sparse: ``(r,)`` directions holding ``mass`` of ``sum |c_k|``.
        parts: names of the upstream parts (``embed``, ``L{l}H{h}``, ``mlp{l}``).
        key_top, query_top: ``(r, P)`` each part's contribution through the top directions via the key / query.
        key_all, query_all: ``(r, P)`` the same through every direction.
    """

    layer: int
    head: int
    rows: Tensor
    keys: Tensor
    scores: Tensor
    terms: Tensor
    sigma: Tensor
    n_sparse: Tensor
    parts: list[str]
    key_top: Tensor
    query_top: Tensor
    key_all: Tensor
    query_all: Tensor
    top: int
    rope: str

    def sources(self, side: str = "key", k: int = 5, through: str = "top") -> list[tuple[str, float]]:
        """Upstream parts ranked by their mean contribution to the traced scores (``side`` key or query)."""
        if side not in ("key", "query") or through not in ("top", "all"):
            raise ValueError(f"side must be key or query and through top or all, got {side!r}, {through!r}")
        t = getattr(self, f"{side}_{through}").mean(0)
        order = t.abs().argsort(descending=True)[:k]
        return [(self.parts[int(i)], float(t[i])) for i in order]

    def summary(self) -> dict:
        K = self.terms.shape[1]
        share = self.terms.abs().sort(-1, descending=True).values
        share = share / share.sum(-1, keepdim=True).clamp_min(1e-300)
        return {"layer": self.layer, "head": self.head, "rope": self.rope, "rows": int(self.rows.numel()),
                "directions": K, "n_sparse_mean": float(self.n_sparse.double().mean()),
                "n_sparse_median": float(self.n_sparse.double().median()),
                "top1_share": float(share[:, 0].mean()), f"top{self.top}_share": float(share[:, :self.top].sum(-1).mean()),
                "key_sources": self.sources("key"), "query_sources": self.sources("query")}

    def to_dict(self) -> dict:
        return {**self.summary(), "rows_pos": self.rows.tolist(), "keys": self.keys.tolist(),
                "scores": self.scores.tolist(), "terms": self.terms.tolist(), "n_sparse": self.n_sparse.tolist(),
                "parts": self.parts, "key_top": self.key_top.tolist(), "query_top": self.query_top.tolist()}


@torch.no_grad()
def sparse_attention_decomposition(
    model: nn.Module, ids: Tensor, layer: int, head: int, *, keys: str | int = "top", rows: slice | None = None,
    rope: str | None = None, top: int = 3, mass: float = 0.9,
) -> SADResult:
    """Decompose ``(layer, head)``'s scores on ``ids (1, T)`` over the singular directions of its QK matrix and
    split each direction's signal over the upstream writers (module docstring). ``rows``: the query rows to
    trace (default: every row from 1 on); ``keys``: ``"top"`` (each row's most attended key) or a position."""
    _check_ids(ids)
    attn = _check_model(model, layer, head)
    if top < 1 or not 0.0 < mass <= 1.0:
        raise ValueError(f"top must be >= 1 and mass in (0, 1], got {top}, {mass}")
    try:
        freqs = inv_freqs(model)[layer]
    except ValueError:
        freqs = None
    rope = rope or ("relative" if freqs is not None else "ignore")
    if rope not in ("relative", "ignore") or (rope == "relative" and freqs is None):
        raise ValueError(f"rope must be 'relative' (RoPE models) or 'ignore', got {rope!r}")
    g = hf.geometry(model)
    T = ids.shape[1]
    row_pos = torch.arange(T)[rows if rows is not None else slice(1, None)]
    if isinstance(keys, int) and not 0 <= keys < T:
        raise ValueError(f"keys={keys} outside 0..{T - 1}")
    if keys != "top" and not isinstance(keys, int):
        raise ValueError(f"keys must be 'top' or a position, got {keys!r}")
    tr = _trace(model, ids)
    _, cache = hf.run_with_cache(model, ids, [f"blocks.{layer}.attn.weights"], rows=(0, T))
    w = cache[f"blocks.{layer}.attn.weights"][0, head]  # (T, T)
    key_pos = w[row_pos].argmax(-1) if keys == "top" else torch.full_like(row_pos, int(keys))
    if (key_pos > row_pos).any() and g.is_causal:
        raise ValueError("a traced key lies after its query (causal model)")

    # upstream parts of the residual entering `layer` (pre-norm: the head outputs add to it directly)
    parts, names = [tr.embed[0].double()], ["embed"]
    prev = tr.embed[0].double()
    for lp in range(layer):
        heads = _head_outputs(model, lp, tr.z[lp])[0]  # (H, T, d)
        for h in range(g.num_heads):
            parts.append(heads[h])
            names.append(f"L{lp}H{h}")
        parts.append(tr.resid[lp][0].double() - prev - tr.out[lp][0].double())
        names.append(f"mlp{lp}")
        prev = tr.resid[lp][0].double()
    P = torch.stack(parts)  # (P, T, d)
    gain, eps = rms_gain(_base(model).layers[layer].input_layernorm)
    inv = torch.rsqrt(prev.pow(2).mean(-1) + eps)  # (T,) 1/rms of the layer input
    Pn = P * gain * inv.view(1, -1, 1)  # each part as it enters the normalized input x
    x = Pn.sum(0)  # (T, d)

    hw = _weights(model, layer, fold_norm=False)
    wq, wk = hw.q[head], hw.k[head]  # (D, d)
    scale = float(attn.scaling)
    K = wq.shape[0]
    terms = torch.zeros(len(row_pos), K, dtype=torch.float64)
    sig = torch.zeros(len(row_pos), K, dtype=torch.float64)
    key_top = torch.zeros(len(row_pos), P.shape[0], dtype=torch.float64)
    query_top, key_all, query_all = torch.zeros_like(key_top), torch.zeros_like(key_top), torch.zeros_like(key_top)
    fixed = factored_svd(wq.T, wk) if rope == "ignore" else None
    for n, (i, j) in enumerate(zip(row_pos.tolist(), key_pos.tolist(), strict=True)):
        U, S, V = fixed if fixed is not None else factored_svd(wq.T, rotate(wk, j - i, freqs))
        a, b = U.T @ x[i], V.T @ x[j]  # (K,)
        c = scale * S * a * b
        terms[n], sig[n] = c, S
        sel = c.abs().argsort(descending=True)[:top]
        # key side: part p's share of b_k is (V^T Pn[p, j])_k; query side: of a_k, (U^T Pn[p, i])_k
        bp, ap = Pn[:, j] @ V, Pn[:, i] @ U  # (P, K)
        key_all[n] = (scale * S * a * bp).sum(-1)
        query_all[n] = (scale * S * b * ap).sum(-1)
        key_top[n] = (scale * S[sel] * a[sel] * bp[:, sel]).sum(-1)
        query_top[n] = (scale * S[sel] * b[sel] * ap[:, sel]).sum(-1)
    return SADResult(layer, head, row_pos, key_pos, terms.sum(-1), terms, sig, n_sparse(terms, mass), names,
                     key_top, query_top, key_all, query_all, top, rope)


__all__ = ["SADResult", "factored_svd", "n_sparse", "rotate", "sparse_attention_decomposition"]
