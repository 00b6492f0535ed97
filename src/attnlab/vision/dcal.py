"""Dual cross-attention learning (V89, DCAL, "Dual Cross-Attention Learning for Fine-Grained Visual
Categorization and Object Re-Identification"): two cross-attentions that share the self-attention's weights.

* **global-local cross-attention (GLCA)**: the ``R`` tokens with the highest accumulated attention (attention
  rollout) are the local queries; they attend to all keys and values:

      S     = Abar_L Abar_{L-1} .. Abar_1,   Abar_l = (1 - residual) mean_h A_l + residual I  (rows renormalized)
      GLCA  = softmax(Q_sel K^T / sqrt(d)) V                Q_sel: the queries of the top-R tokens of ``score``

  where a token's score is its class-token row entry of ``S`` (with a class token) or the mean over queries of
  its column (mean pooling: how much every token is attended, through depth);
* **pair-wise cross-attention (PWCA)**: a second, distracting image's keys and values are appended, so the
  queries of image 1 spread their attention over both images (a training-only regularizer):

      PWCA(X1, X2) = softmax(Q_1 [K_1; K_2]^T / sqrt(d)) [V_1; V_2]

Both read an ``mha`` layer's projections (``project``) and output projection. Costs: GLCA ``R N d``, PWCA
``2 N^2 d`` per head. Deviations: only the two attention operators and the rollout are provided (tested); the
paper's multi-task training (SA, GLCA and PWCA losses with uncertainty weighting) is not wired into the bench.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.checks import positive_int
from ..mechanisms.layers.mha import PatternLayer


def _dense(layer: PatternLayer) -> PatternLayer:
    if not isinstance(layer, PatternLayer) or layer.cfg.pattern is not None:
        raise TypeError(f"DCAL needs a dense attention layer (mha without a pattern), got {type(layer).__name__}")
    return layer


def _heads(layer: PatternLayer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = layer.project(x)
    g = q.shape[1] // k.shape[1]
    return q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)


def attention_rollout(maps: list[Tensor], residual: float = 0.5) -> Tensor:
    """Attention maps (B, H, N, N) of the blocks, first to last -> rollout (B, N, N) with rows summing to 1."""
    if not maps:
        raise ValueError("attention_rollout needs at least one map")
    if not 0 <= residual <= 1:
        raise ValueError(f"residual must be in [0, 1], got {residual!r}")
    s = None
    for a in maps:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        bar = (1 - residual) * a.mean(1) + residual * eye
        bar = bar / bar.sum(-1, keepdim=True)
        s = bar if s is None else bar @ s
    return s


def token_scores(rollout: Tensor, cls: bool) -> Tensor:
    """(B, N, N) rollout -> (B, N) scores: the class token's row (cls) or each column's mean over queries."""
    return rollout[:, 0] if cls else rollout.mean(1)


def global_local_cross_attention(layer: PatternLayer, x: Tensor, scores: Tensor,
                                 top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` highest-scoring tokens' queries over all keys: returns (B, top, dim) and their indices."""
    _dense(layer)
    positive_int("top", top)
    if top > x.shape[1]:
        raise ValueError(f"top ({top}) must be at most the number of tokens ({x.shape[1]})")
    q, k, v = _heads(layer, x)
    idx = scores.topk(top, dim=-1).indices  # (B, top)
    qs = q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    o = torch.nn.functional.scaled_dot_product_attention(qs, k, v, scale=layer.cfg.d**-0.5)
    return layer.out(o), idx


def pair_cross_attention(layer: PatternLayer, x1: Tensor, x2: Tensor) -> Tensor:
    """Image 1's queries over image 1's and image 2's keys and values: (B, N, dim)."""
    _dense(layer)
    q1, k1, v1 = _heads(layer, x1)
    _, k2, v2 = _heads(layer, x2)
    o = torch.nn.functional.scaled_dot_product_attention(q1, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2),
                                                         scale=layer.cfg.d**-0.5)
    return layer.out(o)


def pair_cross_attention_ref(layer: PatternLayer, x1: Tensor, x2: Tensor) -> Tensor:
    """PWCA head by head with an explicit softmax over the 2N keys (no rope / QK-norm)."""
    cfg = layer.cfg
    H, d, g = cfg.heads, cfg.d, cfg.heads // cfg.kvh
    Wq, Wk, Wv = layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight
    xc = torch.cat([x1, x2], 1)
    outs = []
    for h in range(H):
        j = h // g
        q = x1 @ Wq[h * d:(h + 1) * d].T
        k, v = xc @ Wk[j * d:(j + 1) * d].T, xc @ Wv[j * d:(j + 1) * d].T
        s = q @ k.transpose(1, 2) / d**0.5
        e = torch.exp(s - s.amax(-1, keepdim=True))
        outs.append((e / e.sum(-1, keepdim=True)) @ v)
    return torch.cat(outs, -1) @ layer.o_proj.weight.T
