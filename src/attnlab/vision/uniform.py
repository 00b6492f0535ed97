"""Uniform attention (V136, Hyeon-Woo et al. 2023, "Scratching Visual Transformer's Back with Uniform
Attention"): attention whose weights are all ``1 / N``, i.e. every token receives the mean of the values.

    U(X)_i = (1/N sum_j X_j W_V) W_O          (project=True: a value and an output projection)
    U(X)_i =  1/N sum_j X_j                   (project=False: the paper's Context Broadcasting signal)

The paper observes that trained ViTs learn dense (near-uniform) attention maps at a high cost and adds the
dense interaction explicitly: its CB module is ``x + mean(x)`` with no parameters. Cost ``O(N dim)`` (plus the
two projections), no ``N x N`` map. Deviation: the paper inserts CB after the MLP of every block of an existing
ViT; here uniform attention is a token mixer of its own (``x + U(LN(x))``), which with ``project=False`` is CB
applied to the normalized tokens. The class token, when present, is one of the ``N`` tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import MixerContext, register_mixer


class UniformAttention(nn.Module):
    """(B, N, dim) -> (B, N, dim): the (projected) mean token, broadcast to every position."""

    def __init__(self, dim: int, project: bool = True) -> None:
        super().__init__()
        if not isinstance(project, bool):
            raise ValueError(f"project must be True or False, got {project!r}")
        self.v_proj = nn.Linear(dim, dim, bias=False) if project else None
        self.o_proj = nn.Linear(dim, dim, bias=False) if project else None

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(1, keepdim=True)  # mean commutes with the linear value projection: project once
        if self.v_proj is not None:
            m = self.o_proj(self.v_proj(m))
        return m.expand_as(x)

    def reference(self, x: Tensor) -> Tensor:
        """Attention with an explicit N x N matrix of weights 1/N over the values."""
        N = x.shape[1]
        v = x if self.v_proj is None else x @ self.v_proj.weight.T
        a = torch.full((N, N), 1.0 / N, dtype=x.dtype, device=x.device)
        o = torch.einsum("ij,bjd->bid", a, v)
        return o if self.o_proj is None else o @ self.o_proj.weight.T


@register_mixer("uniform", papers=("V136",), summary="uniform attention: every token gets the mean of the values "
                "(Context Broadcasting)", grid_only=False)
def build_uniform(ctx: MixerContext, project: bool = True) -> UniformAttention:
    return UniformAttention(ctx.dim, project)
