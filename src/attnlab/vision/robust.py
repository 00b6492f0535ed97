"""The attention diversification loss of "Robustifying Token Attention for Vision Transformers" (V292).

Under corruptions a ViT's attention collapses: many queries attend to the same few tokens ("token overfocusing"),
so their outputs become alike. The paper's attention diversification loss (ADL) pushes different queries to
attend differently by penalizing the cosine similarity of their attention rows:

    ADL(A) = mean_{i != j} cos(A_i, A_j),     A_i: query i's attention row (per image and head)

averaged over heads, images and the blocks it is applied to, and added to the task loss with a weight
``lambda``. For non-negative rows ``ADL`` lies in [0, 1]: 1 when every query attends alike, 0 when the rows have
disjoint support. Cost ``O(N^3)`` per head for the row Gram matrix. Deviation: the paper's second part,
token-aware average pooling (a learned local pooling before attention), is not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
