"""NiNformer (V93, "NiNformer: A Network in Network Transformer with Token Mixing Generated Gating Function"):
the attention sub-layer replaced by a linear projection gated elementwise by the output of a small MLP-Mixer.

    U = X + (W_t2 GELU(W_t1 LN(X)^T))^T           token mixing over the N tokens (hidden ``token_hidden``)
    G = U + GELU(LN(U) W_c1) W_c2                  channel mixing (hidden ``channel_hidden``)
    NiN(X) = (X W_P) (*) G

The gate is generated from the whole token set (a dynamic, input-dependent gating function) while the gated
path is a static projection: cost ``O(N^2 h_t + N dim h_c + N dim^2)`` with no softmax. The token-mixing MLP
has weights per token position, so the mixer is built for one token count (``prefix + gh * gw``; a class token
is one of the tokens). Deviation: biases everywhere, no dropout; hidden sizes are knobs (defaults ``N`` and
``dim``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import positive_int
from .registry import MixerContext, register_mixer


class NiNGating(nn.Module):
    """(B, N, dim) -> (B, N, dim): ``(X W_P) * MLPMixer(X)``."""

    def __init__(self, dim: int, tokens: int, token_hidden: int | None = None,
                 channel_hidden: int | None = None) -> None:
        super().__init__()
        th = tokens if token_hidden is None else positive_int("token_hidden", token_hidden)
        ch = dim if channel_hidden is None else positive_int("channel_hidden", channel_hidden)
        self.tokens = tokens
        self.proj = nn.Linear(dim, dim)
        self.norm_t, self.tok1, self.tok2 = nn.LayerNorm(dim), nn.Linear(tokens, th), nn.Linear(th, tokens)
        self.norm_c, self.ch1, self.ch2 = nn.LayerNorm(dim), nn.Linear(dim, ch), nn.Linear(ch, dim)

    def gate(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.tokens:
            raise ValueError(f"NiN gating was built for {self.tokens} tokens, got {x.shape[1]}")
        u = x + self.tok2(F.gelu(self.tok1(self.norm_t(x).transpose(1, 2)))).transpose(1, 2)
        return u + self.ch2(F.gelu(self.ch1(self.norm_c(u))))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.gate(x)

    def reference(self, x: Tensor) -> Tensor:
        """Token by token and channel by channel sums written out with einsum, LayerNorm from its formula."""

        def ln(t: Tensor, m: nn.LayerNorm) -> Tensor:
            mu = t.mean(-1, keepdim=True)
            var = ((t - mu) ** 2).mean(-1, keepdim=True)
            return (t - mu) / (var + m.eps).sqrt() * m.weight + m.bias

        def gelu(t: Tensor) -> Tensor:
            return 0.5 * t * (1 + (t / 2**0.5).erf())

        h = gelu(torch.einsum("hn,bnc->bhc", self.tok1.weight, ln(x, self.norm_t)) + self.tok1.bias[:, None])
        u = x + torch.einsum("nh,bhc->bnc", self.tok2.weight, h) + self.tok2.bias[:, None]
        g = u + gelu(ln(u, self.norm_c) @ self.ch1.weight.T + self.ch1.bias) @ self.ch2.weight.T + self.ch2.bias
        return (x @ self.proj.weight.T + self.proj.bias) * g


@register_mixer("ninformer", papers=("V93",), summary="NiNformer: a projection gated by an MLP-Mixer of the tokens",
                grid_only=False)
def build_ninformer(ctx: MixerContext, token_hidden: int | None = None,
                    channel_hidden: int | None = None) -> NiNGating:
    return NiNGating(ctx.dim, ctx.tokens, token_hidden, channel_hidden)
