"""The attention diversification loss of "Robustifying Token Attention for Vision Transformers" (V292).

Under corruptions a ViT's attention collapses: many queries attend to the same few tokens ("token overfocusing"),
so their outputs become alike. The paper's attention diversification loss (ADL) pushes different queries to
attend differently by penalizing the cosine similarity of their attention rows:

    ADL(A) = mean_{i != j} cos(A_i, A_j),     A_i: query i's attention row (per image and head)

averaged over heads, images and the blocks it is applied to, and added to the task loss with a weight
``lambda``. For non-negative rows ``ADL`` lies in [0, 1]: 1 when every query attends alike, 0 when the rows have
disjoint support. Cost ``O(N^3)`` per head for the row Gram matrix.

The paper's second part, **token-aware average pooling (TAP)**, lets each token's neighbourhood take part in
attention: before the attention of a block, every token is replaced by a per-token mixture of average poolings
of its neighbourhood at several dilations,

    TAP(X)_p = sum_k pi_k(p) P_k(X)_p,     P_0 = identity,  P_k = (1/9) sum of the 3 x 3 window of dilation k
                                            centred on p, zero outside the image (k = 1 .. K - 1)
    pi(p)    = softmax_k(Conv3x3(Conv3x3(X))_p / temperature)       (a dilation predictor: C -> K -> K maps)

and the attention runs on ``TAP(X)`` (mixer ``tap``: TAP then ``mha``). What was read: the abstract and the
authors' public implementation (the method section itself was not available here): K branches of dilation
0 .. K-1, a 3 x 3 unfold mean with zero padding, a two-convolution predictor with a softmax over K.
Deviations: the predictor's BatchNorm between its two convolutions is left out; TAP sits in the mixer slot, so
it pools ``LN(x)`` where the authors pool ``x`` and normalize after. Cost ``O(9 N C K)`` for the poolings plus
``O(9 N K (C + K))`` for the predictor's two convolutions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from ..mechanisms import registry as mech
from .common import conv_ref, shifted, to_image, to_tokens
from .registry import MixerContext, catalogue_options, register_mixer


def diversification_loss(maps: list[Tensor] | Tensor, eps: float = 1e-12) -> Tensor:
    """``mean_{i != j} cos(A_i, A_j)`` of attention maps (B, H, N, N) (or a list of them, averaged)."""
    if isinstance(maps, Tensor):
        maps = [maps]
    if not maps:
        raise ValueError("diversification_loss needs at least one attention map")
    out = []
    for a in maps:
        if a.dim() != 4 or a.shape[-1] < 1 or a.shape[-2] < 2:
            raise ValueError(f"attention maps must be (B, H, N, N) with N >= 2, got {tuple(a.shape)}")
        u = a / a.norm(dim=-1, keepdim=True).clamp(min=eps)
        gram = u @ u.transpose(-1, -2)  # (B, H, N, N): cosines between rows
        n = a.shape[-2]
        off = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
        out.append((off / (n * (n - 1))).mean())
    return torch.stack(out).mean()


class TokenAwarePooling(nn.Module):
    """V292's TAP on grid tokens (B, gh * gw, C) -> (B, gh * gw, C): a per-token softmax mixture of the identity
    and ``branches - 1`` zero-padded 3 x 3 means of dilation 1, 2, ...; the weights come from two 3 x 3
    convolutions (C -> K -> K, no bias)."""

    def __init__(self, dim: int, grid: tuple[int, int], branches: int = 3, temperature: float = 1.0) -> None:
        super().__init__()
        positive_int("dim", dim)
        positive_int("branches", branches)
        if branches < 2:
            raise ValueError(f"branches must be at least 2 (the identity and one pooling), got {branches}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.grid, self.branches, self.temperature = tuple(grid), branches, float(temperature)
        self.predict1 = nn.Conv2d(dim, branches, 3, padding=1, bias=False)
        self.predict2 = nn.Conv2d(branches, branches, 3, padding=1, bias=False)

    def pooled(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, K, N, C): the identity and each dilation's zero-padded 3 x 3 mean."""
        img = to_image(x, self.grid)
        C = img.shape[1]
        kern = torch.full((C, 1, 3, 3), 1 / 9, dtype=img.dtype, device=img.device)
        outs = [x] + [to_tokens(F.conv2d(img, kern, padding=d, dilation=d, groups=C))
                      for d in range(1, self.branches)]
        return torch.stack(outs, 1)

    def weights(self, x: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, K): each token's pooling-scheme weights (rows sum to 1)."""
        logits = self.predict2(self.predict1(to_image(x, self.grid)))
        return (to_tokens(logits) / self.temperature).softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bnk,bknc->bnc", self.weights(x), self.pooled(x))

    def reference(self, x: Tensor) -> Tensor:
        """The same from shifted copies (explicit loops), reference convolutions and an explicit softmax."""
        img = to_image(x, self.grid)
        logits = to_tokens(conv_ref(conv_ref(img, self.predict1.weight, None), self.predict2.weight, None))
        logits = logits / self.temperature
        e = torch.exp(logits - logits.amax(-1, keepdim=True))
        w = e / e.sum(-1, keepdim=True)
        out = w[..., :1] * x
        for d in range(1, self.branches):
            total = sum(shifted(img, dy * d, dx * d) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
            out = out + w[..., d:d + 1] * to_tokens(total / 9)
        return out


class TAPAttention(nn.Module):
    """TAP, then an attention layer: ``attn(TAP(x))``."""

    def __init__(self, tap: TokenAwarePooling, attn: nn.Module) -> None:
        super().__init__()
        self.tap, self.attn = tap, attn

    def forward(self, x: Tensor) -> Tensor:
        return self.attn(self.tap(x))


@register_mixer("tap", papers=("V292",), summary="token-aware average pooling (a per-token mixture of dilated "
                "3 x 3 means) before mha", grid_only=True)
def build_tap(ctx: MixerContext, branches: int = 3, temperature: float = 1.0, **options: Any) -> nn.Module:
    tap = TokenAwarePooling(ctx.dim, ctx.grid, branches, temperature)
    return TAPAttention(tap, mech.build("mha", **catalogue_options(mech.get("mha"), ctx, options)))
