"""Attention transfer (V124, "On the Surprising Effectiveness of Attention Transfer for Vision Transformers"):
a student ViT trained from scratch that receives only the attention patterns of a pretrained teacher.

* **attention copy**: the student's blocks use the teacher's attention maps instead of their own:
  ``O = A_teacher (X W_V) W_O`` (the student learns values, MLPs, norms and head; no queries or keys);
* **attention distillation**: the student computes its own maps and adds
  ``lambda * mean_{blocks, heads, queries} KL(A_teacher[i] || A_student[i])`` to its task loss (the paper's
  cross-entropy between the maps differs from this KL by the teacher's entropy, a constant).

Here the teacher is a ViT attnlab trains itself (no pretrained weights): ``attnlab bench vision --transfer``
trains it on one task and transfers its maps to a student on another. The maps are those of the blocks whose
mixer is dense softmax attention over all tokens (``mha`` with no pattern or score modifier), computed from the
layer's own projections (``project``: QK-norm and RoPE included when configured) as
``softmax(Q K^T / sqrt(d))`` per head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..mechanisms.layers.mha import PatternLayer


def _dense_layer(mixer: nn.Module) -> PatternLayer:
    cfg = getattr(mixer, "cfg", None)
    if not isinstance(mixer, PatternLayer) or cfg.pattern is not None or getattr(cfg, "score_mod", None):
        raise TypeError(f"attention maps need dense softmax attention mixers (mha without a pattern), got "
                        f"{type(mixer).__name__}")
    return mixer


def head_maps(layer: PatternLayer, x: Tensor) -> tuple[Tensor, Tensor]:
    """Normalized tokens (B, N, dim) -> (attention maps (B, H, N, N), values (B, H, N, d)), key/value heads
    repeated to the query heads."""
    q, k, v = layer.project(x)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    a = (q @ k.transpose(-1, -2) * layer.cfg.d**-0.5).softmax(-1)
    return a, v


def forward_with_maps(vit: nn.Module, img: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The logits of ``vit`` and the attention maps (B, H, N, N) of every block (each mixer must be dense
    attention), from one forward pass (differentiable when ``vit`` is)."""
    layers = [_dense_layer(b.mixer) for b in vit.blocks]
    maps: list[Tensor] = []
    x = vit.tokens(img)
    for block, layer in zip(vit.blocks, layers):
        a, v = head_maps(layer, block.norm1(x))
        maps.append(a)
        x = x + layer.out(a @ v)
        x = x + block.mlp(block.norm2(x))
    return vit.head(vit.pool(vit.norm(x))), maps


def attention_maps(vit: nn.Module, img: Tensor) -> list[Tensor]:
    """The attention maps (B, H, N, N) of every block of ``vit``."""
    return forward_with_maps(vit, img)[1]


def distillation_loss(student: list[Tensor], teacher: list[Tensor], eps: float = 1e-12) -> Tensor:
    """``mean KL(teacher row || student row)`` over blocks, images, heads and queries; 0 when equal."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} maps, teacher {len(teacher)}")
    kl = [(t * ((t + eps).log() - (s + eps).log())).sum(-1).mean() for s, t in zip(student, teacher)]
    return torch.stack(kl).mean()


def copy_logits(student: nn.Module, teacher_maps: list[Tensor], img: Tensor) -> Tensor:
    """The student's logits with each block attending by the teacher's map: ``x + A_t (LN(x) W_V) W_O``."""
    layers = [_dense_layer(b.mixer) for b in student.blocks]
    if len(teacher_maps) != len(layers):
        raise ValueError(f"{len(teacher_maps)} teacher maps for {len(layers)} student blocks")
    x = student.tokens(img)
    for block, layer, a in zip(student.blocks, layers, teacher_maps):
        _, _, v = layer.project(block.norm1(x))
        v = v.repeat_interleave(a.shape[1] // v.shape[1], 1)
        x = x + layer.out(a.to(v.dtype) @ v)
        x = x + block.mlp(block.norm2(x))
    return student.head(student.pool(student.norm(x)))
