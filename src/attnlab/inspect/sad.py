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
  given key position (``keys=int``, e.g. a sink or an induction target; on a sliding-window layer a key
  outside the row's window gets the bilinear score that the model's mask removes).
* ``n_sparse(i)``: the smallest number of directions whose ``|c_k|`` hold ``mass`` (0.9) of ``sum_k |c_k|``.
* ``through_top``: an upstream part's contribution to the score through the row's top ``top`` directions (by
  ``|c_k|``); ``through_all``: through every direction (its direct-path share of the whole score). Both sum,
  over all parts, to the corresponding score exactly.

Beyond Llama-style layers (each rule keeps the terms summing exactly to the model's score):

* **q/k norm** (Gemma 3, Qwen3): ``q_i = g_q * (W_Q x_i) / rms(W_Q x_i)`` per head (``rms(y) = sqrt(mean(y^2) +
  eps)`` over the head dims; ``g`` is the norm's gain, Gemma's ``1 + weight``), likewise ``k_j``. The per-token
  scalars ``a_i = 1 / rms(W_Q x_i)`` and ``b_j = 1 / rms(W_K x_j)`` factor out of the bilinear form:
  ``s_ij = scale * a_i b_j * x_i^T M' x_j`` with ``M' = W_Q^T diag(g_q) R_{j-i} diag(g_k) W_K`` (gains folded
  into the weights). The SVD is of ``M'``; each ``c_k = scale * sigma_k (a_i u_k . x_i) (b_j v_k . x_j)``
  carries the token scalars, which we put in the direction signals (``query_signal = a_i U^T x_i``,
  ``key_signal = b_j V^T x_j``; ``a = b = 1`` without q/k norm). ``scale`` is the layer's own (Gemma 3:
  ``query_pre_attn_scalar ** -0.5``).
* **q/k biases** (Qwen2): homogeneous coordinates, ``x -> [x; 1]`` and ``W -> [W b]``, so ``M`` is
  ``(d+1) x (d+1)`` and the bias terms (q-side, k-side and bias-bias) are inside the decomposition; the constant
  coordinate is one more upstream part named ``bias``.
* **sandwich norms** (Gemma 3): layer ``l``'s attention writes ``g_pa * o / rms(o)`` to the residual (``o`` the
  summed head outputs, ``g_pa`` the ``post_attention_layernorm`` gain), so head ``h``'s part is
  ``g_pa * o_h / rms(o)`` (the shared ``1 / rms(o)`` taken from the layer's own output); the MLP's part is what
  the block added after ``post_feedforward_layernorm`` (one part per layer, so no split is needed); ``embed`` is
  the embedding as the model scales it (Gemma: times ``sqrt(d)``). Then every part passes the input RMSNorm of
  ``layer`` with the frozen ``1 / rms`` of the whole residual, as in the pre-norm case.
* An ``o_proj`` bias of an earlier layer is its own part ``L{l}bias``; the MLP part of layer ``l`` is the
  residual's change minus the attention parts, so the parts sum to the residual stream exactly.

Not supported (raises): attention logit soft-capping (the score is then not bilinear), fused q/k/v projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf
from .causal import _base, _check_ids, _head_outputs, _inv_rms, _sandwich, _trace, rms_gain
from .circuits import _weights
from .rope_usage import inv_freqs


def _check_model(model: nn.Module, layer: int, head: int) -> nn.Module:
    g = hf.geometry(model)
    if not 0 <= layer < g.num_layers:
        raise ValueError(f"layer {layer} outside 0..{g.num_layers - 1}")
    if not 0 <= head < g.num_heads:
        raise ValueError(f"head {head} outside 0..{g.num_heads - 1}")
    if getattr(hf._text_config(model), "attn_logit_softcapping", None):
        raise ValueError("attention logit soft-capping makes the score non-bilinear: SAD is not defined")
    return dict(hf.attention_modules(model))[layer]


@dataclass(frozen=True)
class _QKMaps:
    """One head's score map in (possibly homogeneous) coordinates ``n = d`` or ``d + 1``: ``wq, wk (D, n)``
    the raw projections (``[W b]`` with biases), ``gq, gk (D,)`` the q/k-norm gains (None: no norm) and
    their eps; ``d`` the residual width."""

    wq: Tensor
    wk: Tensor
    gq: Tensor | None
    gk: Tensor | None
    eps_q: float
    eps_k: float
    d: int

    @property
    def homogeneous(self) -> bool:
        """Whether the maps act on ``[x; 1]`` (a q or k bias)."""
        return self.wq.shape[1] == self.d + 1

    def token_scalars(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x (T, n)`` -> ``(a, b)``, each ``(T,)``: ``1 / rms`` of the head's raw q and k (ones without a
        q/k norm)."""
        ones = torch.ones(x.shape[0], dtype=torch.float64)
        a = ones if self.gq is None else torch.rsqrt((x @ self.wq.T).pow(2).mean(-1) + self.eps_q)
        b = ones if self.gk is None else torch.rsqrt((x @ self.wk.T).pow(2).mean(-1) + self.eps_k)
        return a, b

    def folded(self) -> tuple[Tensor, Tensor]:
        """``diag(g_q) W_Q``, ``diag(g_k) W_K`` (``(D, n)`` each)."""
        q = self.wq if self.gq is None else self.gq.view(-1, 1) * self.wq
        k = self.wk if self.gk is None else self.gk.view(-1, 1) * self.wk
        return q, k


def _qk_maps(model: nn.Module, attn: nn.Module, layer: int, head: int) -> _QKMaps:
    g = hf.geometry(model)
    hw = _weights(model, layer, fold_norm=False)
    wq, wk = hw.q[head], hw.k[head]  # (D, d); k already mapped to the query head's kv head
    D, d = wq.shape
    bq, bk = (getattr(getattr(attn, n), "bias", None) for n in ("q_proj", "k_proj"))
    if bq is not None or bk is not None:  # homogeneous coordinates: x -> [x; 1], W -> [W b]
        kv = head // (g.num_heads // g.num_kv_heads)
        bq = torch.zeros(D, dtype=torch.float64) if bq is None else bq.detach().double().cpu().view(-1, D)[head]
        bk = torch.zeros(D, dtype=torch.float64) if bk is None else bk.detach().double().cpu().view(-1, D)[kv]
        wq, wk = torch.cat([wq, bq.view(D, 1)], 1), torch.cat([wk, bk.view(D, 1)], 1)
    norms = []
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        norms.append((None, 0.0) if norm is None else rms_gain(norm))
    (gq, eq), (gk, ek) = norms
    return _QKMaps(wq, wk, gq, gk, eq, ek, d)


def _upstream(model: nn.Module, tr, layer: int) -> tuple[list[str], Tensor, Tensor]:
    """The writers of the residual stream entering ``layer``: ``names``, ``parts (P, T, d)`` (float64, as they
    add to the residual) and the residual itself ``(T, d)`` (the model's, which the parts sum to)."""
    base = _base(model)
    g = hf.geometry(model)
    prev = tr.embed[0].double()
    parts, names = [prev], ["embed"]
    mods = dict(hf.attention_modules(model))
    for lp in range(layer):
        pieces = list(_head_outputs(model, lp, tr.z[lp])[0])  # H x (T, d)
        names += [f"L{lp}H{h}" for h in range(g.num_heads)]
        ob = getattr(mods[lp].o_proj, "bias", None)
        if ob is not None:
            pieces.append(ob.detach().double().cpu().expand_as(pieces[0]))
            names.append(f"L{lp}bias")
        lm = base.layers[lp]
        if _sandwich(lm):  # post_attention_layernorm: gain * piece / rms(attention output), rms frozen
            gain, eps = rms_gain(lm.post_attention_layernorm)
            s = _inv_rms(tr.out[lp][0], eps)  # (T, 1) from the layer's own o_proj output
            pieces = [p * gain * s for p in pieces]
        parts += pieces
        cur = tr.resid[lp][0].double()
        parts.append(cur - prev - torch.stack(pieces).sum(0))  # the MLP's write (post-FF norm included)
        names.append(f"mlp{lp}")
        prev = cur
    return names, torch.stack(parts), prev


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
        query_signal, key_signal: ``(r, K)`` the direction signals ``a_i u_k . x_i`` and ``b_j v_k . x_j``
            (``terms = scale * sigma * query_signal * key_signal``).
        top_dirs: ``(r, top)`` each row's top directions (by ``|c_k|``).
        query_dir, key_dir: ``(r, P, top)`` each part's share of the signals of those directions (summing over
            parts to ``query_signal`` / ``key_signal`` gathered at ``top_dirs``).
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
    query_signal: Tensor
    key_signal: Tensor
    top_dirs: Tensor
    query_dir: Tensor
    key_dir: Tensor

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

    names, P, resid = _upstream(model, tr, layer)  # (P, T, d), (T, d)
    gain, eps = rms_gain(_base(model).layers[layer].input_layernorm)
    inv = torch.rsqrt(resid.pow(2).mean(-1) + eps)  # (T,) 1/rms of the layer input, frozen
    Pn = P * gain * inv.view(1, -1, 1)  # each part as it enters the normalized input x
    maps = _qk_maps(model, attn, layer, head)
    if maps.homogeneous:  # the constant coordinate is one more part
        Pn = torch.cat([Pn, torch.zeros(*Pn.shape[:2], 1, dtype=Pn.dtype)], -1)
        const = torch.zeros(1, T, Pn.shape[-1], dtype=Pn.dtype)
        const[..., -1] = 1.0
        Pn, names = torch.cat([Pn, const]), [*names, "bias"]
    x = Pn.sum(0)  # (T, n)
    qa, kb = maps.token_scalars(x)  # (T,) each: 1/rms of the raw q and k (ones without q/k norm)
    fq, fk = maps.folded()  # (D, n)

    scale = float(attn.scaling)
    R, K, NP = len(row_pos), fq.shape[0], Pn.shape[0]
    f64 = dict(dtype=torch.float64)
    terms, sig, qsig, ksig = (torch.zeros(R, K, **f64) for _ in range(4))
    key_top, query_top, key_all, query_all = (torch.zeros(R, NP, **f64) for _ in range(4))
    top_dirs = torch.zeros(R, min(top, K), dtype=torch.long)
    query_dir, key_dir = (torch.zeros(R, NP, min(top, K), **f64) for _ in range(2))
    fixed = factored_svd(fq.T, fk) if rope == "ignore" else None
    for n, (i, j) in enumerate(zip(row_pos.tolist(), key_pos.tolist(), strict=True)):
        U, S, V = fixed if fixed is not None else factored_svd(fq.T, rotate(fk, j - i, freqs))
        a, b = qa[i] * (U.T @ x[i]), kb[j] * (V.T @ x[j])  # (K,) direction signals
        c = scale * S * a * b
        terms[n], sig[n], qsig[n], ksig[n] = c, S, a, b
        sel = c.abs().argsort(descending=True)[:top]
        # key side: part p's share of b_k is b_j (V^T Pn[p, j])_k; query side: of a_k, a_i (U^T Pn[p, i])_k
        bp, ap = kb[j] * (Pn[:, j] @ V), qa[i] * (Pn[:, i] @ U)  # (P, K)
        key_all[n] = (scale * S * a * bp).sum(-1)
        query_all[n] = (scale * S * b * ap).sum(-1)
        key_top[n] = (scale * S[sel] * a[sel] * bp[:, sel]).sum(-1)
        query_top[n] = (scale * S[sel] * b[sel] * ap[:, sel]).sum(-1)
        top_dirs[n], key_dir[n], query_dir[n] = sel, bp[:, sel], ap[:, sel]
    return SADResult(layer, head, row_pos, key_pos, terms.sum(-1), terms, sig, n_sparse(terms, mass), names,
                     key_top, query_top, key_all, query_all, top, rope, qsig, ksig, top_dirs, query_dir, key_dir)


__all__ = ["SADResult", "factored_svd", "n_sparse", "rotate", "sparse_attention_decomposition"]
