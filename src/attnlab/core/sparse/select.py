"""Dense forms of a selection, for the float64 reference and the selection-quality diagnostic.

:func:`selection_mask` turns a key-centric selection into a dense boolean mask, written independently of the
planner (a scatter into a dense table); :func:`masked_reference` is the float64 oracle under such a mask;
:func:`selection_recall` says how much dense attention a selection keeps. All of them use the one masked
softmax (:mod:`attnlab.core.softmax`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..patterns import Causal
from ..softmax import masked_softmax, weights_chunks


def selection_mask(
    sel: Tensor, valid: Tensor, key_sets: Tensor, Tk: int, q_offset: int = 0, causal: bool = True
) -> Tensor:
    """Dense boolean (B, H, Tq, Tk): query i may see key j iff j is in one of its selected sets (and j <= i
    if causal). Written independently of the tile builder (scatter into a dense table)."""
    B, H, Tq, n = sel.shape
    Bs, Hs, S, K = key_sets.shape
    member = torch.zeros(Bs, Hs, S, Tk + 1, dtype=torch.bool, device=sel.device)
    pos = torch.where((key_sets >= 0) & (key_sets < Tk), key_sets, torch.full_like(key_sets, Tk))
    member.scatter_(-1, pos, True)
    member = member[..., :Tk].expand(B, H, S, Tk)
    idx = sel.clamp(0, S - 1).unsqueeze(-1).expand(B, H, Tq, n, Tk).reshape(B, H, Tq * n, Tk)
    picked = torch.gather(member, 2, idx).view(B, H, Tq, n, Tk) & valid.unsqueeze(-1)
    mask = picked.any(3)
    if causal:
        mask = mask & torch.ones(Tq, Tk, dtype=torch.bool, device=sel.device).tril(q_offset)
    return mask


def masked_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None) -> Tensor:
    """Dense float64 attention with a per-(batch, head) boolean mask (B or 1, H or 1, Tq, Tk); empty rows -> 0.

    q (B, H, Tq, D), k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv) float64.
    """
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    rep = q.shape[1] // k.shape[1]
    kd, vd = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kd) * scale
    return masked_softmax(s, mask) @ vd


def selection_recall(
    q: Tensor,
    k: Tensor,
    mask: Tensor,
    causal: bool = True,
    q_offset: int | None = None,
    scale: float | None = None,
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Selection-quality diagnostic per head, against dense attention (float64).

    q (B, H, Tq, D), k (B, Hkv, Tk, D), mask (B or 1, H, Tq, Tk) the selection.
    Returns per head (H,) averaged over batch and queries:
      ``mass``:     attention probability the selection keeps (1 = lossless)
      ``top_recall``: fraction of each query's true top-n keys that are selected, n = its selected count
      ``sparsity``: 1 - selected pairs / pairs dense attention allows (causal or full)
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    q_offset = Tk - Tq if q_offset is None else q_offset
    scale = D**-0.5 if scale is None else scale
    mass = torch.zeros(B, H, dtype=torch.float64)
    topr = torch.zeros(B, H, dtype=torch.float64)
    sel = torch.zeros(B, H, dtype=torch.float64)
    allowed = torch.zeros((), dtype=torch.float64)
    pattern = Causal() if causal else None
    for r0, p in weights_chunks(q, k, scale=scale, q_offset=q_offset, pattern=pattern, rows=chunk,
                                dtype=torch.float64):
        r1 = r0 + p.shape[2]
        ok = torch.ones(r1 - r0, Tk, dtype=torch.bool, device=q.device)
        if causal:
            ok = ok.tril(q_offset + r0)
        m = mask[:, :, r0:r1].expand(B, H, r1 - r0, Tk) & ok
        mass += (p * m).sum(-1).sum(-1).cpu()
        n = m.sum(-1)  # (B, H, r)
        # rank of each key in its row (0 = largest weight); a selected key counts if its rank < n
        rank = torch.argsort(torch.argsort(p, dim=-1, descending=True, stable=True), dim=-1, stable=True)
        hit = (m & (rank < n.unsqueeze(-1))).sum(-1).double()
        topr += torch.where(n > 0, hit / n.clamp(min=1), torch.ones_like(hit)).sum(-1).cpu()
        sel += n.sum(-1).double().cpu()
        allowed += ok.sum()
    return {
        "mass": (mass / Tq).mean(0),
        "top_recall": (topr / Tq).mean(0),
        "sparsity": 1.0 - (sel / allowed).mean(0),
    }


__all__ = ["masked_reference", "selection_mask", "selection_recall"]
