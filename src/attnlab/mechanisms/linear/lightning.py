"""Lightning Attention (R18, R16): decayed linear attention computed intra-block quadratic, inter-block recurrent.

Per head ``h`` with decay ``lambda_h``: ``O = Norm([(Q K^T) * M] V)``, ``M[t, s] = lambda_h^(t - s)`` for ``s <= t``;
``Q = silu(X W_q)``, ``K = silu(X W_k)``, no softmax and no denominator (TransNormerLLM's NormAttention: an
RMS norm of the output replaces the normalizer). Lightning Attention splits the sequence into blocks: inside a
block the masked product is computed directly ("conventional attention"), across blocks a carried ``d x d``
state ``S`` does the rest ("linear attention kernel trick"), so cost is linear and constant per token.
The op ``lightning`` (``attnlab.ops.linear``, on ``attnlab.core.linear.linear_attention(mode="chunked")``) is that
algorithm; the block size is ``chunk``.

Decay (TransNormerLLM): ``lambda_h = exp(-(decay_scale * h / H) * (1 - layer_idx / layers))``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.checks import nonneg_int, positive_int
from ...core.linear import state_numbers
from ...ops.linear import lightning_log_decay
from ..registry import register
from ._common import LinearHeadsConfig, LinearLayer, causal_mask


@dataclass(frozen=True)
class LightningConfig(LinearHeadsConfig):
    """decay_scale: 8 in TransNormerLLM (head h decays by exp(-8h/H) per token at layer 0); layer_idx / layers:
    the layer's place (decay weakens with depth); norm_eps: the output RMS norm's epsilon."""

    decay_scale: float = 8.0
    layer_idx: int = 0
    layers: int = 1
    norm_eps: float = 1e-6

    def validate(self) -> None:
        super().validate()
        nonneg_int("layer_idx", self.layer_idx)
        positive_int("layers", self.layers)
        if self.layer_idx >= self.layers:
            raise ValueError(f"layer_idx ({self.layer_idx}) must be < layers ({self.layers})")
        if self.decay_scale < 0:
            raise ValueError(f"decay_scale must be >= 0, got {self.decay_scale}")


@register(
    "lightning",
    family="linear",
    papers=("R16", "R18"),
    year=2024,
    summary="Lightning Attention-2: per-head decayed linear attention, intra-block quadratic + inter-block state",
    config=LightningConfig,
)
class LightningAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``H * d * d`` numbers at any length. Op ``lightning`` (silu
    features and the decays inside), then the output RMS norm."""

    op = "lightning"

    def __init__(self, cfg: LightningConfig) -> None:
        super().__init__(cfg)

    def log_decay(self) -> Tensor:
        """(H,) log lambda_h <= 0."""
        c = self.cfg
        return lightning_log_decay(c.heads, c.decay_scale, c.layer_idx, c.layers)

    def _norm(self, o: Tensor) -> Tensor:
        return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.cfg.norm_eps)

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x)
        return torch.nn.functional.silu(q), torch.nn.functional.silu(k), v

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """(B, H, T, d) attention output -> (B, T, dim)."""
        return self.out(self._norm(o))

    def reference(self, x: Tensor) -> Tensor:
        """O = Norm([(Q K^T) * M] V) with the decay mask M[t, s] = lambda^(t - s) written out."""
        q, k, v = self.features(x)
        T = x.shape[1]
        t = torch.arange(T, device=x.device, dtype=x.dtype)
        lam = self.log_decay().to(x.dtype).exp().view(-1, 1, 1)
        M = lam ** (t[:, None] - t[None, :]).clamp_min(0) * causal_mask(T, x.device)
        return self.finish(((q @ k.transpose(-1, -2)) * M) @ v, x)

    def state_size(self, seq_len: int) -> int:
        return state_numbers(self.heads, self.d, self.d, normalize=False)
