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
``2 N^2 d`` per head.

**Training** (:class:`DCALViT`): three branches trained together,

* SA: the ViT itself (``L`` self-attention blocks);
* GLCA: ``M = 1`` extra block with its own weights (GLCA does not share the SA weights), reading the tokens that
  enter the last SA block; its queries are the top ``R = ceil(top_ratio N)`` tokens of the rollout of all ``L``
  SA blocks, its output tokens go through the block's MLP, a final LayerNorm, a mean and its own classifier;
* PWCA: the SA blocks with the SA weights (shared): at every block image 1's queries attend over both images'
  keys and values; the distractor's tokens go through the same blocks with plain self-attention. The label is
  image 1's. Training only.

The three cross-entropies are combined with uncertainty weighting (Kendall et al., as DCAL does):

    L = 1/2 (exp(-w_1) L_SA + exp(-w_2) L_GLCA + exp(-w_3) L_PWCA + w_1 + w_2 + w_3),    w learned, start 0

Inference drops PWCA and adds the class probabilities of SA and GLCA (the paper's rule for classification).
Conventions: the distractor of each image is the next image of the batch (the batch rolled by one, a random
pair since batches are drawn at random); GLCA pools its ``R`` tokens by their mean; the rollout is the
class-token row with a class token, else the column mean (:func:`token_scores`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def uncertainty_weighted_loss(losses: Tensor, log_vars: Tensor) -> Tensor:
    """``1/2 sum_i (exp(-w_i) L_i + w_i)``: task losses (K,) and learned log-variances ``w`` (K,)."""
    if losses.shape != log_vars.shape or losses.dim() != 1:
        raise ValueError(f"losses {tuple(losses.shape)} and log_vars {tuple(log_vars.shape)} must both be (K,)")
    return 0.5 * (torch.exp(-log_vars) * losses + log_vars).sum()


@dataclass(frozen=True)
class DCALConfig:
    """top_ratio: GLCA's share of tokens used as local queries (the paper: 10% for classification);
    residual: the rollout's identity share; pwca: train the PWCA branch."""

    top_ratio: float = 0.1
    residual: float = 0.5
    pwca: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.top_ratio, bool) or not 0 < self.top_ratio <= 1:
            raise ValueError(f"top_ratio must be in (0, 1], got {self.top_ratio!r}")
        if not 0 <= self.residual <= 1:
            raise ValueError(f"residual must be in [0, 1], got {self.residual!r}")


class DCALViT(nn.Module):
    """A dense-``mha`` ViT with DCAL's GLCA block and PWCA training. ``losses(img, labels)`` trains (all three
    branches); ``forward(img)`` is inference: ``softmax(SA) + softmax(GLCA)`` (B, classes), no PWCA."""

    def __init__(self, vit: nn.Module, cfg: DCALConfig = DCALConfig()) -> None:
        super().__init__()
        from .registry import MixerContext, build_mixer
        from .vit import Block

        self.layers = [_dense(b.mixer) for b in vit.blocks]
        self.vit, self.cfg = vit, cfg
        vc = vit.cfg
        n = vc.prefix + vc.grid[0] * vc.grid[1]
        self.top = max(1, math.ceil(cfg.top_ratio * n))
        hidden = vit.blocks[0].mlp.fc1.out_features
        self.glca_block = Block(vc.dim, build_mixer("mha", MixerContext(vc.attn, vc.grid, vc.prefix)), hidden)
        self.glca_norm = nn.LayerNorm(vc.dim)
        self.glca_head = nn.Linear(vc.dim, vc.classes)
        self.log_vars = nn.Parameter(torch.zeros(3))  # w_SA, w_GLCA, w_PWCA

    def sa(self, img: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """SA branch: (logits, rollout (B, N, N), tokens entering the last block)."""
        from .attn_transfer import head_maps

        x = self.vit.tokens(img)
        maps, last_in = [], x
        for block, layer in zip(self.vit.blocks, self.layers):
            last_in = x
            a, v = head_maps(layer, block.norm1(x))
            maps.append(a)
            x = x + layer.out(a @ v)
            x = x + block.mlp(block.norm2(x))
        logits = self.vit.head(self.vit.pool(self.vit.norm(x)))
        return logits, attention_rollout([m.detach() for m in maps], self.cfg.residual), last_in

    def glca(self, last_in: Tensor, rollout: Tensor) -> Tensor:
        """GLCA branch logits from the tokens entering the last SA block and the SA rollout."""
        b = self.glca_block
        scores = token_scores(rollout, cls=self.vit.cfg.pooling == "cls")
        o, idx = global_local_cross_attention(b.mixer, b.norm1(last_in), scores, self.top)
        x = last_in.gather(1, idx[..., None].expand(-1, -1, last_in.shape[-1])) + o
        x = x + b.mlp(b.norm2(x))
        return self.glca_head(self.glca_norm(x).mean(1))

    def pwca(self, img: Tensor, distractor: Tensor) -> Tensor:
        """PWCA branch logits of ``img`` with ``distractor``'s keys and values appended at every block."""
        x1, x2 = self.vit.tokens(img), self.vit.tokens(distractor)
        for block, layer in zip(self.vit.blocks, self.layers):
            h1, h2 = block.norm1(x1), block.norm1(x2)
            x1 = x1 + pair_cross_attention(layer, h1, h2)
            x2 = x2 + layer(h2)
            x1 = x1 + block.mlp(block.norm2(x1))
            x2 = x2 + block.mlp(block.norm2(x2))
        return self.vit.head(self.vit.pool(self.vit.norm(x1)))

    def losses(self, img: Tensor, labels: Tensor, distractor: Tensor | None = None) -> dict[str, Tensor]:
        """The branch cross-entropies and their uncertainty-weighted total (``"total"``). ``distractor``
        defaults to the batch rolled by one."""
        sa, rollout, last_in = self.sa(img)
        parts = [F.cross_entropy(sa, labels), F.cross_entropy(self.glca(last_in, rollout), labels)]
        if self.cfg.pwca:
            d = img.roll(1, 0) if distractor is None else distractor
            parts.append(F.cross_entropy(self.pwca(img, d), labels))
        stacked = torch.stack(parts)
        total = uncertainty_weighted_loss(stacked, self.log_vars[:len(parts)])
        names = ("sa", "glca", "pwca")[:len(parts)]
        return {**dict(zip(names, parts)), "total": total}

    def forward(self, img: Tensor) -> Tensor:
        sa, rollout, last_in = self.sa(img)
        return sa.softmax(-1) + self.glca(last_in, rollout).softmax(-1)
