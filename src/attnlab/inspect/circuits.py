"""Weights-only circuit analysis (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits").

Conventions (column vectors, as in the paper): a residual vector ``x (d,)``; head ``h`` of a layer has
``W_Q, W_K (D, d)``, ``W_V (Dv, d)`` (the rows of ``q_proj`` / ``k_proj`` / ``v_proj`` for that head) and
``W_O (d, Dv)`` (its columns of ``o_proj``). Then

* ``W_QK = W_Q^T W_K (d, d)``: the score of query ``x_i`` on key ``x_j`` is ``x_i^T W_QK x_j`` (times the
  model's scale);
* ``W_OV = W_O W_V (d, d)``: attending to ``x_j`` writes ``W_OV x_j`` into the residual stream.

Both are returned factored (:class:`LowRank`, rank <= head_dim), never as ``d x d`` unless asked.

* The layer's input RMSNorm gain (and Gemma 3's q/k-norm gains) are folded into ``W_Q``, ``W_K``, ``W_V``
  (``fold_norm=True``); the ``1 / rms`` scales are data-dependent and ignored, as is usual.
* RoPE makes the real QK interaction position-dependent (``x_i^T W_Q^T R_{j-i} W_K x_j``); the weights-only
  QK circuit ignores RoPE (the relative rotation at distance 0), as the literature does.
* GQA: query head ``h`` reads key/value head ``h // (H / H_kv)``.
* Composition scores (Elhage et al. 2021, section "Virtual attention heads"), head ``A`` in an earlier layer
  writing, head ``B`` in a later layer reading, Frobenius norms:
  Q: ``||W_QK^B^T W_OV^A|| / (||W_QK^B|| ||W_OV^A||)``; K: ``||W_QK^B W_OV^A|| / (...)``;
  V: ``||W_OV^B W_OV^A|| / (||W_OV^B|| ||W_OV^A||)``. Computed from the factors with Gram matrices
  (``O(D^3)`` per pair, never ``d x d``).
* Copying score (Elhage et al. 2021): the eigenvalues ``lambda`` of the full OV circuit through the embedding
  and unembedding, ``W_U W_OV W_E`` (vocab x vocab), scored ``sum(lambda) / sum(|lambda|)`` in ``[-1, 1]``
  (positive: the head copies the token it attends to). The non-zero eigenvalues of ``(W_U W_O)(W_V W_E)``
  equal those of the ``Dv x Dv`` matrix ``(W_V W_E)(W_U W_O)``, so the full vocabulary costs one
  ``d x V x d`` product (``W_E W_U``, shared by all heads), not a ``V x V`` eigenproblem; ``vocab=n`` caps it to
  a random subset of ``n`` tokens for very large vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf
from .causal import rms_gain


@dataclass(frozen=True)
class LowRank:
    """A ``(d, d)`` matrix held as ``left @ right``: ``left (d, r)``, ``right (r, d)`` (float64)."""

    left: Tensor
    right: Tensor

    def full(self) -> Tensor:
        """The ``(d, d)`` matrix."""
        return self.left @ self.right

    def singular_values(self) -> Tensor:
        """``(r,)`` singular values, descending, from the ``r x r`` core (QR of both factors)."""
        _, ra = torch.linalg.qr(self.left)
        _, rb = torch.linalg.qr(self.right.T)
        return torch.linalg.svdvals(ra @ rb.T)

    def frobenius(self) -> float:
        """``||left @ right||_F`` from the Gram matrices."""
        return float(((self.left.T @ self.left) * (self.right @ self.right.T)).sum().clamp_min(0).sqrt())


def _layer_modules(model: nn.Module) -> list[nn.Module]:
    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: expected a decoder with .layers (Llama / Qwen2 / Gemma 3 style)")
    return list(layers)


def _gain(norm: nn.Module | None, d: int) -> Tensor:
    """The elementwise gain of an RMSNorm (``w`` or Gemma's ``1 + w``); ones without a norm."""
    if norm is None:
        return torch.ones(d, dtype=torch.float64)
    return rms_gain(norm)[0]


@dataclass(frozen=True)
class _HeadWeights:
    """All heads of one layer: ``q, k (H, D, d)``, ``v (H, Dv, d)``, ``o (H, d, Dv)``; k/v already mapped from
    each query head to its kv head (GQA)."""

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor


def _weights(model: nn.Module, layer: int, fold_norm: bool = True) -> _HeadWeights:
    g = hf.geometry(model)
    if not 0 <= layer < g.num_layers:
        raise ValueError(f"layer {layer} outside 0..{g.num_layers - 1}")
    attn = dict(hf.attention_modules(model))[layer]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attn, name):
            raise ValueError(f"{type(attn).__name__} has no {name}: only separate q/k/v/o projections are supported")
    H, Hkv, D = g.num_heads, g.num_kv_heads, g.head_dim
    wq = attn.q_proj.weight.detach().double().cpu()
    wk = attn.k_proj.weight.detach().double().cpu()
    wv = attn.v_proj.weight.detach().double().cpu()
    wo = attn.o_proj.weight.detach().double().cpu()
    d = wq.shape[1]
    Dv = wv.shape[0] // Hkv
    q, k, v = wq.view(H, D, d), wk.view(Hkv, D, d), wv.view(Hkv, Dv, d)
    o = wo.view(d, H, Dv).permute(1, 0, 2)  # (H, d, Dv)
    if fold_norm:
        layer_mod = _layer_modules(model)[layer]
        gin = _gain(getattr(layer_mod, "input_layernorm", None), d)
        q, k, v = q * gin, k * gin, v * gin
        if getattr(attn, "q_norm", None) is not None:
            q = q * _gain(attn.q_norm, D).view(1, D, 1)
        if getattr(attn, "k_norm", None) is not None:
            k = k * _gain(attn.k_norm, D).view(1, D, 1)
    kv = torch.arange(H) // (H // Hkv)
    return _HeadWeights(q, k[kv], v[kv], o)


def _check_head(model: nn.Module, head: int) -> None:
    H = hf.geometry(model).num_heads
    if not 0 <= head < H:
        raise ValueError(f"head {head} outside 0..{H - 1}")


def qk_circuit(model: nn.Module, layer: int, head: int, *, fold_norm: bool = True) -> LowRank:
    """``W_QK = W_Q^T W_K`` of (layer, query head) as ``LowRank(W_Q^T (d, D), W_K (D, d))`` (RoPE ignored)."""
    _check_head(model, head)
    w = _weights(model, layer, fold_norm)
    return LowRank(w.q[head].T.contiguous(), w.k[head].contiguous())


def ov_circuit(model: nn.Module, layer: int, head: int, *, fold_norm: bool = True) -> LowRank:
    """``W_OV = W_O W_V`` of (layer, query head) as ``LowRank(W_O (d, Dv), W_V (Dv, d))``."""
    _check_head(model, head)
    w = _weights(model, layer, fold_norm)
    return LowRank(w.o[head].contiguous(), w.v[head].contiguous())


def _embed_unembed(model: nn.Module, vocab: int | None, seed: int) -> Tensor:
    """The ``(d, d)`` matrix ``W_E W_U = sum_t e_t u_t^T`` (column convention: ``W_E (d, V)`` holds the
    embeddings as columns, ``W_U (V, d)`` the unembedding rows) over the vocabulary or a random subset of it.
    The final norm is ignored, as in Elhage et al."""
    emb = model.get_input_embeddings().weight.detach().double().cpu()  # (V, d): column t is e_t
    unemb = model.get_output_embeddings().weight.detach().double().cpu()  # (V, d): row t is u_t
    V = emb.shape[0]
    if vocab is not None and vocab < V:
        idx = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:vocab]
        emb, unemb = emb[idx], unemb[idx]
    scale = getattr(model.get_input_embeddings(), "embed_scale", None)  # Gemma scales its embeddings
    if scale is not None:
        emb = emb * float(scale)
    return emb.T @ unemb  # (d, d) = W_E W_U


def _copying(o: Tensor, v: Tensor, eu: Tensor) -> float:
    core = v @ eu @ o  # (Dv, Dv) = W_V W_E W_U W_O: same non-zero eigenvalues as W_U W_O W_V W_E
    lam = torch.linalg.eigvals(core)
    den = float(lam.abs().sum())
    return float(lam.sum().real) / den if den > 1e-12 else float("nan")


def copying_score(model: nn.Module, layer: int, head: int, *, vocab: int | None = None, seed: int = 0,
                  fold_norm: bool = True) -> float:
    """Elhage et al.'s copying score ``sum(lambda) / sum(|lambda|)`` of the full OV circuit
    ``W_U W_OV W_E`` of one head (NaN when the circuit is zero); ``vocab`` caps the tokens used."""
    ov = ov_circuit(model, layer, head, fold_norm=fold_norm)
    return _copying(ov.left, ov.right, _embed_unembed(model, vocab, seed))


def copying_scores(model: nn.Module, *, vocab: int | None = None, seed: int = 0, fold_norm: bool = True) -> Tensor:
    """``(layers, heads)`` copying scores (float64)."""
    g = hf.geometry(model)
    eu = _embed_unembed(model, vocab, seed)
    out = torch.empty(g.num_layers, g.num_heads, dtype=torch.float64)
    for layer in range(g.num_layers):
        w = _weights(model, layer, fold_norm)
        for h in range(g.num_heads):
            out[layer, h] = _copying(w.o[h], w.v[h], eu)
    return out


def svd_spectra(model: nn.Module, *, fold_norm: bool = True) -> dict[str, Tensor]:
    """``{"qk": (layers, heads, D), "ov": (layers, heads, Dv)}`` singular values of every head's circuits."""
    g = hf.geometry(model)
    qk, ov = [], []
    for layer in range(g.num_layers):
        w = _weights(model, layer, fold_norm)
        qk.append(torch.stack([LowRank(w.q[h].T, w.k[h]).singular_values() for h in range(g.num_heads)]))
        ov.append(torch.stack([LowRank(w.o[h], w.v[h]).singular_values() for h in range(g.num_heads)]))
    return {"qk": torch.stack(qk), "ov": torch.stack(ov)}


def _prod_norm2(left_gram: Tensor, mid: Tensor, right_gram: Tensor) -> Tensor:
    """``||A M B||_F^2 = tr(M^T (A^T A) M (B B^T))`` batched: grams ``(..., p, p)``, ``(..., s, s)``;
    mid ``(..., p, s)``."""
    return ((left_gram @ mid) * (mid @ right_gram)).sum((-1, -2)).clamp_min(0)


def composition_scores(model: nn.Module, *, fold_norm: bool = True) -> dict[str, Tensor]:
    """Q-, K- and V-composition scores between every ordered pair of heads.

    Returns ``{"q": S, "k": S, "v": S}``, ``S (layers, heads, layers, heads)`` float64: ``S[l1, h1, l2, h2]``
    is how much head ``(l2, h2)`` reads (with its queries / keys / values) what head ``(l1, h1)`` writes;
    zero unless ``l1 < l2``.
    """
    g = hf.geometry(model)
    L, H = g.num_layers, g.num_heads
    ws = [_weights(model, layer, fold_norm) for layer in range(L)]
    out = {kind: torch.zeros(L, H, L, H, dtype=torch.float64) for kind in ("q", "k", "v")}
    # Grams of each factor: W_QK = W_Q^T W_K, W_OV = W_O W_V
    gq = [w.q @ w.q.transpose(1, 2) for w in ws]  # (H, D, D) = W_Q W_Q^T
    gk = [w.k @ w.k.transpose(1, 2) for w in ws]
    gv = [w.v @ w.v.transpose(1, 2) for w in ws]  # (H, Dv, Dv)
    go = [w.o.transpose(1, 2) @ w.o for w in ws]  # (H, Dv, Dv) = W_O^T W_O
    n_qk = [(gq[i] * gk[i]).sum((-1, -2)).sqrt() for i in range(L)]  # ||W_Q^T W_K||_F
    n_ov = [(go[i] * gv[i]).sum((-1, -2)).sqrt() for i in range(L)]  # ||W_O W_V||_F
    for l1 in range(L):
        a = ws[l1]
        for l2 in range(l1 + 1, L):
            b = ws[l2]
            # Q: W_QK^T W_OV = W_K^T (W_Q W_O1) W_V1 ; K: W_QK W_OV = W_Q^T (W_K W_O1) W_V1
            # V: W_OV2 W_OV1 = W_O2 (W_V2 W_O1) W_V1; mids (H2, H1, p, Dv)
            mq = torch.einsum("bpd,adv->bapv", b.q, a.o)
            mk = torch.einsum("bpd,adv->bapv", b.k, a.o)
            mv = torch.einsum("bpd,adv->bapv", b.v, a.o)
            right = gv[l1].unsqueeze(0)  # (1, H1, Dv, Dv)
            den = n_ov[l1].view(1, H) * 1.0
            for kind, left, mid, nb in (("q", gk[l2], mq, n_qk[l2]), ("k", gq[l2], mk, n_qk[l2]),
                                        ("v", go[l2], mv, n_ov[l2])):
                num = _prod_norm2(left.unsqueeze(1), mid, right).sqrt()  # (H2, H1)
                d = nb.view(H, 1) * den
                s = torch.where(d > 0, num / d.clamp_min(1e-300), torch.zeros_like(num))
                out[kind][l1, :, l2, :] = s.T
    return out


__all__ = ["LowRank", "composition_scores", "copying_score", "copying_scores", "ov_circuit", "qk_circuit",
           "svd_spectra"]
