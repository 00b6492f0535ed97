"""APLA (V210, "APLA: A Simple Adaptation Method for Vision Transformers"): adapt a pretrained ViT to a new task
by training only the attention output projection ``W_O`` of each block -- optionally only a fixed random subset
of its columns -- and nothing else (no new parameters, no adapters); the classifier head is trained too (a new
task has new classes).

    trainable = { W_O^l[:, S_l] : l = 1 .. depth } U { head },   |S_l| = round(fraction * (H d))

where the columns ``S_l`` index the concatenated head outputs that ``W_O`` reads. The subset is enforced by a
gradient mask, so an optimizer must not decay the frozen entries: :func:`apla` returns the trainable
parameters to optimize with ``weight_decay=0``. Here the pretrained model is a ViT attnlab trained itself
(``attnlab bench vision --transfer``). A mixer qualifies when it has an ``o_proj`` linear layer (``mha`` and the
catalogue's attention layers, ``uniform``, ``region``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..mechanisms.heads import positive_number


def apla(vit: nn.Module, fraction: float = 1.0, seed: int = 0, train_head: bool = True) -> list[nn.Parameter]:
    """Freeze ``vit`` except the blocks' ``o_proj`` weights (a random ``fraction`` of their input columns) and,
    with ``train_head``, the classifier head; returns the trainable parameters."""
    positive_number("fraction", fraction)
    if fraction > 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    projs = [b.mixer.o_proj for b in vit.blocks if isinstance(getattr(b.mixer, "o_proj", None), nn.Linear)]
    if not projs:
        raise TypeError("APLA needs attention mixers with an output projection (o_proj); this ViT has none")
    for p in vit.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params: list[nn.Parameter] = []
    for proj in projs:
        w = proj.weight
        w.requires_grad_(True)
        cols = w.shape[1]
        keep = max(1, round(fraction * cols))
        if keep < cols:
            mask = torch.zeros(cols, dtype=w.dtype)
            mask[torch.randperm(cols, generator=g)[:keep]] = 1
            mask = mask.to(w.device)
            w.register_hook(lambda grad, m=mask: grad * m)  # frozen columns get no gradient
            proj.apla_columns = mask.bool()
        params.append(w)
    if train_head:
        for p in vit.head.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params
