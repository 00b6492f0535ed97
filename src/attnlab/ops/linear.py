"""Linear forms as ops: the q/k/v computations of :mod:`attnlab.core.linear`, registered by name.

Every op here carries a recurrent state (``cache == "recurrent"``): called on a prefix with ``state=OpState()``
it returns ``(out, state)``; later calls see only their own keys and continue from the state, so a chunked prefill
followed by token-by-token decoding equals the full parallel form. ``mode`` picks the form
(``"parallel"`` quadratic, ``"chunked"`` Lightning-style blocks of ``chunk`` tokens, ``"recurrent"`` token by token:
identical results). ``reference`` of each op is its parallel (quadratic) form written plainly in float64.

* ``linear``     -- ``o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps)``
  (Katharopoulos et al. 2020; ``normalize=False`` drops the denominator; ``causal=False`` sums every key).
* ``retention``  -- decayed linear attention ``o_t = sum_{s<=t} gamma_h^(t-s) (q_t.k_s) v_s``, RetNet's per-head
  decays ``gamma_h = 1 - 2^(-5-h)`` unless ``decay`` gives them.
* ``lightning``  -- Lightning Attention / TransNormerLLM: ``silu`` features and per-head decays
  ``exp(-(decay_scale h / H)(1 - layer_idx / layers))``, no denominator.
* ``cumulative_softmax`` -- ``o_t = sum_m phi(q_t)_m sum_{j<=t} softmax_{j<=t}(k_{.m})_j v_j``: each key feature
  takes a softmax over the prefix (LightNet's additive recurrence, Agent attention's agent step).

Scores are kernel products, not softmax rows: ``scale`` is not used, and a free ``mask`` is refused.
Grouped-query keys/values are repeated to the query heads (the state is per query head).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.linear import MODES, SoftmaxState, cumulative_softmax_attention, linear_attention
from ..core.softmax import masked_softmax
from .registry import register_op

FEATURE_MAPS = ("elu1", "relu", "taylor", "identity", "silu", "sigmoid")
Q_MAPS = ("identity", "silu", "softmax")
RENAMED = {"chunk_size": "chunk"}


def feature_map(x: Tensor, kind: str) -> Tensor:
    """phi(x) of linear attention.

    * ``elu1``: elu(x) + 1 (Katharopoulos et al. 2020), F = d.
    * ``relu``: max(x, 0), F = d.
    * ``taylor``: second-order Taylor expansion of exp (Based): ``[1, x', vec(x' x'^T) / sqrt 2]`` with
      ``x' = x / d^(1/4)``, so ``phi(q).phi(k) = 1 + q.k/sqrt d + (q.k)^2 / (2 d)``; F = 1 + d + d^2.
    * ``identity``, ``silu``, ``sigmoid``: as named.
    """
    if kind == "elu1":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "identity":
        return x
    if kind == "silu":
        return F.silu(x)
    if kind == "sigmoid":
        return torch.sigmoid(x)
    if kind == "taylor":
        d = x.shape[-1]
        x = x / d**0.25
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)
    raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")


_phi = feature_map  # the ops' option of the same name shadows the function inside them


def kernel_scores(q: Tensor, k: Tensor, kind: str) -> Tensor:
    """Plain ``(B, H, Tq, Tk)`` similarities ``phi(q_i) . phi(k_j)`` without the feature expansion where one
    exists (Taylor: ``1 + s + s^2 / 2`` with ``s = q.k / sqrt d``) -- the references use this."""
    if kind == "taylor":
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return 1.0 + s + 0.5 * s * s
    return feature_map(q, kind) @ feature_map(k, kind).transpose(-1, -2)


def _checks(name: str, mask: Tensor | None, mode: str, chunk: int) -> None:
    if mask is not None:
        raise ValueError(f"op {name!r} is a linear form and cannot honour a free mask (mask must be None)")
    if mode not in MODES:
        raise ValueError(f"op {name!r}: mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"op {name!r}: chunk must be a positive integer, got {chunk!r}")


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Keys/values repeated to the query heads (B, H, Tk, D)."""
    g = q.shape[1] // k.shape[1]
    return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))


def _causal(Tq: int, Tk: int, device: torch.device) -> Tensor:
    """(Tq, Tk) bool: query i (the last Tq of Tk positions) sees key j <= its position."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


def _run(name: str, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None, state: dict | None, *,
         normalize: bool, eps: float, mode: str, chunk: int) -> Tensor | tuple[Tensor, dict]:
    """The causal decayed kernel with the state carried under ``state["S"]``."""
    o, S = linear_attention(q, k, v, log_decay, state=None if state is None else state.get("S"),
                            normalize=normalize, eps=eps, mode=mode, chunk=chunk)
    if state is None:
        return o
    state["S"] = S
    return o, state


# ---- linear ------------------------------------------------------------------------------------------------------

@register_op("linear", family="linear", papers=("R33", "R53"), cache="recurrent", renamed=RENAMED,
             summary="causal (or bidirectional) kernel linear attention phi(q).phi(k), row-normalized; "
             "O(1) decoding state", options={"feature_map": "elu1", "normalize": True, "eps": 1e-6, "causal": True,
                                             "mode": "chunked", "chunk": 64},
             reference=lambda *a, **kw: linear_reference(*a, **kw))
def linear_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
              state: dict | None = None, feature_map: str = "elu1", normalize: bool = True, eps: float = 1e-6,
              causal: bool = True, mode: str = "chunked", chunk: int = 64):
    """q (B, H, Tq, D), k, v (B, Hkv, Tq, D) -> (B, H, Tq, Dv)."""
    _checks("linear", mask, mode, chunk)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"op 'linear': feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    k, v = _grouped(q, k, v)
    fq, fk = _phi(q, feature_map), _phi(k, feature_map)
    if causal:
        return _run("linear", fq, fk, v, None, state, normalize=normalize, eps=eps, mode=mode, chunk=chunk)
    # every query sees every key: one state over all of them
    S = fk.transpose(-1, -2) @ v
    o = fq @ S
    if normalize:
        o = o / (fq @ fk.sum(2, keepdim=True).transpose(-1, -2) + eps)
    return o if state is None else (o, state)


def linear_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, q_offset: int = 0,
                     mask: Tensor | None = None, feature_map: str = "elu1", normalize: bool = True,
                     eps: float = 1e-6, causal: bool = True, **_: Any) -> Tensor:
    """A = phi(Q) phi(K)^T (masked to past keys when causal), O = A V / (rowsum A + eps) in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = _grouped(q, k, v)
    A = kernel_scores(q, k, feature_map)
    if causal:
        A = A.masked_fill(~_causal(q.shape[2], k.shape[2], q.device), 0.0)
    o = A @ v
    return o / (A.sum(-1, keepdim=True) + eps) if normalize else o


# ---- decayed forms -------------------------------------------------------------------------------------------------

def retention_log_decay(heads: int, decay: Any = None) -> Tensor:
    """(H,) float64 log decays: RetNet's ``log(1 - 2^(-5-h))`` or ``log`` of the given per-head decays."""
    if decay is None:
        return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(heads, dtype=torch.float64)))
    g = torch.as_tensor(decay, dtype=torch.float64).reshape(-1)
    if g.numel() == 1:
        g = g.expand(heads)
    if g.numel() != heads or bool(((g <= 0) | (g > 1)).any()):
        raise ValueError(f"op 'retention': decay must be one number or one per head ({heads}) in (0, 1], got {decay!r}")
    return g.log()


def lightning_log_decay(heads: int, decay_scale: float = 8.0, layer_idx: int = 0, layers: int = 1) -> Tensor:
    """(H,) float64 log decays of TransNormerLLM: ``-(decay_scale h / H) (1 - layer_idx / layers)``."""
    if decay_scale < 0 or not 0 <= layer_idx < layers:
        raise ValueError(f"op 'lightning': needs decay_scale >= 0 and 0 <= layer_idx < layers, got {decay_scale}, "
                         f"{layer_idx}, {layers}")
    h = torch.arange(heads, dtype=torch.float64)
    return -(decay_scale * h / heads) * (1.0 - layer_idx / layers)


@register_op("retention", family="linear", cache="recurrent", causal_only=True, renamed=RENAMED,
             summary="decayed linear attention (retention): sum_s gamma_h^(t-s) (q_t.k_s) v_s, per-head decays",
             options={"decay": None, "feature_map": "identity", "normalize": False, "eps": 1e-6,
                      "mode": "chunked", "chunk": 64},
             reference=lambda *a, **kw: retention_reference(*a, **kw))
def retention_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                 state: dict | None = None, decay: Any = None, feature_map: str = "identity",
                 normalize: bool = False, eps: float = 1e-6, mode: str = "chunked", chunk: int = 64):
    _checks("retention", mask, mode, chunk)
    k, v = _grouped(q, k, v)
    g = retention_log_decay(q.shape[1], decay)
    return _run("retention", _phi(q, feature_map), _phi(k, feature_map), v, g, state, normalize=normalize, eps=eps,
                mode=mode, chunk=chunk)


@register_op("lightning", family="linear", papers=("R16", "R18"), cache="recurrent", causal_only=True,
             renamed=RENAMED, summary="Lightning Attention: silu features, TransNormerLLM per-head decay, "
             "intra-block quadratic + inter-block state", options={"decay_scale": 8.0, "layer_idx": 0, "layers": 1,
                                                                   "feature_map": "silu", "mode": "chunked",
                                                                   "chunk": 64},
             reference=lambda *a, **kw: lightning_reference(*a, **kw))
def lightning_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                 state: dict | None = None, decay_scale: float = 8.0, layer_idx: int = 0, layers: int = 1,
                 feature_map: str = "silu", mode: str = "chunked", chunk: int = 64):
    _checks("lightning", mask, mode, chunk)
    k, v = _grouped(q, k, v)
    g = lightning_log_decay(q.shape[1], decay_scale, layer_idx, layers)
    return _run("lightning", _phi(q, feature_map), _phi(k, feature_map), v, g, state, normalize=False, eps=0.0,
                mode=mode, chunk=chunk)


def _decayed_reference(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, feature: str, normalize: bool,
                       eps: float) -> Tensor:
    q, k, v = (t.double() for t in (q, k, v))
    k, v = _grouped(q, k, v)
    Tq, Tk = q.shape[2], k.shape[2]
    i = torch.arange(Tk - Tq, Tk, dtype=torch.float64, device=q.device)[:, None]
    j = torch.arange(Tk, dtype=torch.float64, device=q.device)[None, :]
    lam = log_decay.to(q.device).exp().view(-1, 1, 1)  # (H, 1, 1)
    M = lam ** (i - j).clamp_min(0) * _causal(Tq, Tk, q.device)  # M[t, s] = gamma^(t - s), s <= t
    A = (feature_map(q, feature) @ feature_map(k, feature).transpose(-1, -2)) * M
    o = A @ v
    return o / (A.sum(-1, keepdim=True) + eps) if normalize else o


def retention_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, q_offset: int = 0,
                        mask: Tensor | None = None, decay: Any = None, feature_map: str = "identity",
                        normalize: bool = False, eps: float = 1e-6, **_: Any) -> Tensor:
    """O = (phi(Q) phi(K)^T * M) V with M[t, s] = gamma_h^(t-s) for s <= t, in float64."""
    return _decayed_reference(q, k, v, retention_log_decay(q.shape[1], decay), feature_map, normalize, eps)


def lightning_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, q_offset: int = 0,
                        mask: Tensor | None = None, decay_scale: float = 8.0, layer_idx: int = 0, layers: int = 1,
                        feature_map: str = "silu", **_: Any) -> Tensor:
    """O = (phi(Q) phi(K)^T * M) V with TransNormerLLM's per-head decays, in float64."""
    g = lightning_log_decay(q.shape[1], decay_scale, layer_idx, layers)
    return _decayed_reference(q, k, v, g, feature_map, False, 0.0)


# ---- cumulative softmax ----------------------------------------------------------------------------------------------

def _q_map(q: Tensor, kind: str) -> Tensor:
    if kind == "identity":
        return q
    if kind == "silu":
        return F.silu(q)
    if kind == "softmax":
        return q.softmax(-1)
    raise ValueError(f"op 'cumulative_softmax': q_map must be one of {Q_MAPS}, got {kind!r}")


@register_op("cumulative_softmax", family="linear", papers=("R40", "R55"), cache="recurrent", causal_only=True,
             renamed=RENAMED, summary="per-feature softmax of the keys over the prefix, read by the query features "
             "(LightNet's additive recurrence, Agent attention's agent step)",
             options={"q_map": "identity", "mode": "chunked", "chunk": 64},
             reference=lambda *a, **kw: cumulative_softmax_reference(*a, **kw))
def cumulative_softmax_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int,
                          mask: Tensor | None = None, state: dict | None = None, q_map: str = "identity",
                          mode: str = "chunked", chunk: int = 64):
    """q (B, H, T, F) query features, k (B, Hkv, T, F) key logits, v (B, Hkv, T, Dv) -> (B, H, T, Dv)."""
    _checks("cumulative_softmax", mask, mode, chunk)
    k, v = _grouped(q, k, v)
    prev = None if state is None else state.get("softmax")
    o, st = cumulative_softmax_attention(_q_map(q, q_map), k, v, state=prev, mode=mode, chunk=chunk)
    if state is None:
        return o
    state["softmax"] = SoftmaxState(*st)
    return o, state


def cumulative_softmax_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, q_offset: int = 0,
                                 mask: Tensor | None = None, q_map: str = "identity", **_: Any) -> Tensor:
    """Per feature m a masked softmax over (query time, key time) of k_{.m}, read by phi(q)_m, in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = _grouped(q, k, v)
    Tq, Tk = q.shape[2], k.shape[2]
    logits = k.transpose(-1, -2)[..., None, :].expand(-1, -1, -1, Tq, -1)  # (B, H, F, Tq, Tk)
    w = masked_softmax(logits, _causal(Tq, Tk, q.device))
    return torch.einsum("bhtm,bhmtd->bhtd", _q_map(q, q_map), w @ v[:, :, None])


__all__ = ["FEATURE_MAPS", "cumulative_softmax_op", "feature_map", "kernel_scores", "lightning_log_decay",
           "lightning_op", "linear_op", "retention_log_decay", "retention_op"]
