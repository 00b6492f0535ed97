"""RoPE frequency usage per head (A248, Hong et al., "On the token distance modeling ability of higher RoPE
attention dimension").

RoPE rotates each query/key pair of dimensions ``f`` by ``pos * theta_f``. In the Hugging Face convention
(``rotate_half``) pair ``f`` of a ``D``-dimensional head is dims ``(f, f + D/2)``, ``f = 0 .. D/2 - 1``, with
``theta_f = inv_freq[f]`` falling with ``f``: low ``f`` = high frequency (short wavelength ``2 pi / theta_f``),
high ``f`` = the "higher dimensions" of A248, which rotate slowly and so can carry long-distance information.
The post-RoPE score splits exactly over pairs:

    q_i . k_j = sum_f c_f[i, j],   c_f[i, j] = q_i[f] k_j[f] + q_i[f + D/2] k_j[f + D/2].

Measures per head (conventions chosen here, named):

* ``score_share (F,)``  -- attention-weighted absolute contribution: ``sum_ij A_ij |c_f[i, j]|``, normalized
  over ``f`` (sums to 1). How much of the scores the head actually acts on each pair carries.
* ``norm_share (F,)``   -- weights-free: ``mean_i ||q_i^f|| * mean_j ||k_j^f||``, normalized over ``f`` (the
  q/k norm carried by each frequency).
* ``low_share``         -- ``score_share`` summed over the *low-frequency* pairs: those whose wavelength exceeds
  the probe length ``T`` (they do not complete one turn within the context).
* ``high_dim_corr``     -- A248's dimension-level reading, as a Pearson correlation over pairs between the pair
  index ``f`` and ``score_share``: > 0 means the head leans on the higher (slower) dimensions. A248 calls
  heads that concentrate on the higher dimensions "positional heads"; ``positional`` flags
  ``high_dim_corr >= threshold`` (0.5 by default, our threshold).

Everything reads the seam's ``blocks.{l}.attn.{q,k,weights}`` points (post-RoPE q/k; the weights the layer
really used), so it measures whatever attention runs (``hf.use``). Query rows are handled chunk by chunk as
the ``weights`` hook delivers them: ``O(H F r T)`` memory for ``r`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models import hf


def inv_freqs(model: nn.Module) -> Tensor:
    """``(L, D/2)`` RoPE angular frequencies per layer, read from the model's rotary module (Gemma 3: the
    sliding and full layers have their own bases). Raises when the model has no rotary embedding."""
    g = hf.geometry(model)
    buffers = dict(model.named_buffers())
    types = getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "layer_types", None)
    rows = []
    for layer in range(g.num_layers):
        cand = [n for n in buffers if n.endswith("rotary_emb.inv_freq")]
        if types is not None:
            typed = [n for n in buffers if n.endswith(f"rotary_emb.{types[layer]}_inv_freq")]
            cand = typed or cand
        if not cand:
            raise ValueError(f"{type(model).__name__}: no rotary_emb inv_freq buffer (RoPE usage needs a RoPE model)")
        rows.append(buffers[cand[0]].detach().double().cpu())
    f = torch.stack(rows)
    if f.shape[1] * 2 != g.head_dim:
        raise ValueError(f"rotary inv_freq has {f.shape[1]} frequencies for head_dim {g.head_dim}: partial RoPE "
                         "is not supported")
    return f


def pair_contributions(q: Tensor, k: Tensor) -> Tensor:
    """``q (..., Tq, D)``, ``k (..., Tk, D)`` -> ``c (..., F, Tq, Tk)`` with ``F = D/2``: the share of
    ``q . k`` carried by each rotate-half pair ``(f, f + D/2)``; ``c.sum(-3) == q @ k^T``."""
    D = q.shape[-1]
    if D % 2 or k.shape[-1] != D:
        raise ValueError(f"q and k need the same even head_dim, got {D} and {k.shape[-1]}")
    F = D // 2
    qp = torch.stack([q[..., :F], q[..., F:]], -1)  # (..., Tq, F, 2)
    kp = torch.stack([k[..., :F], k[..., F:]], -1)
    return torch.einsum("...ifc,...jfc->...fij", qp, kp)


def pair_norms(x: Tensor) -> Tensor:
    """``x (..., T, D)`` -> ``(..., T, D/2)``: the norm of each rotate-half pair (invariant under RoPE)."""
    F = x.shape[-1] // 2
    return torch.sqrt(x[..., :F] ** 2 + x[..., F:] ** 2)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation along the last dim (NaN when either side is constant)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    return torch.where(den > 0, (a * b).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


@dataclass(frozen=True)
class RopeUsage:
    """Per (layer, head) RoPE frequency usage on one probe of ``T`` tokens.

    Attributes:
        score_share: ``(L, H, F)`` attention-weighted |pair contribution| share (sums to 1 over F).
        norm_share: ``(L, H, F)`` q/k pair-norm product share (sums to 1 over F).
        inv_freq: ``(L, F)`` angular frequency of each pair.
        T: probe length.
    """

    score_share: Tensor
    norm_share: Tensor
    inv_freq: Tensor
    T: int

    @property
    def wavelength(self) -> Tensor:
        """``(L, F)`` tokens per full turn, ``2 pi / theta_f``."""
        return 2 * math.pi / self.inv_freq

    @property
    def low_mask(self) -> Tensor:
        """``(L, F)`` True for the low-frequency pairs: wavelength > T."""
        return self.wavelength > self.T

    @property
    def low_share(self) -> Tensor:
        """``(L, H)`` share of the attention-weighted |score| on the low-frequency pairs."""
        return (self.score_share * self.low_mask[:, None, :]).sum(-1)

    @property
    def high_dim_corr(self) -> Tensor:
        """``(L, H)`` Pearson correlation over pairs between the pair index and ``score_share``."""
        idx = torch.arange(self.score_share.shape[-1], dtype=self.score_share.dtype)
        return _pearson(self.score_share, idx.expand_as(self.score_share))

    def positional(self, threshold: float = 0.5) -> Tensor:
        """``(L, H)`` bool: heads whose usage grows with the pair index (A248's positional heads, our cut)."""
        return self.high_dim_corr >= threshold

    def per_layer(self) -> list[dict[str, float]]:
        """One row per layer: head means of ``low_share`` / ``high_dim_corr``, the share on the top quarter of
        pairs (the slowest), the most used pair (mode over heads) and the number of positional heads."""
        F = self.score_share.shape[-1]
        rows = []
        for layer in range(self.score_share.shape[0]):
            s = self.score_share[layer]
            top = s.argmax(-1)
            rows.append({
                "layer": layer,
                "low_share": float(self.low_share[layer].mean()),
                "slowest_quarter": float(s[:, F - F // 4:].sum(-1).mean()),
                "fastest_quarter": float(s[:, :F // 4].sum(-1).mean()),
                "high_dim_corr": float(self.high_dim_corr[layer].nanmean()),
                "top_pair": int(torch.mode(top).values),
                "positional_heads": int(self.positional()[layer].sum()),
                "norm_low_share": float((self.norm_share[layer] * self.low_mask[layer]).sum(-1).mean()),
            })
        return rows

    def to_dict(self) -> dict:
        return {"T": self.T, "score_share": self.score_share.tolist(), "norm_share": self.norm_share.tolist(),
                "inv_freq": self.inv_freq.tolist(), "low_share": self.low_share.tolist(),
                "high_dim_corr": self.high_dim_corr.tolist(), "per_layer": self.per_layer()}


def rope_usage(model: nn.Module, ids: Tensor) -> RopeUsage:
    """RoPE frequency usage of every head of ``model`` on ``ids (1, T)`` (see the module docstring)."""
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be one sequence (1, T), got shape {tuple(ids.shape)}")
    g = hf.geometry(model)
    freqs = inv_freqs(model)
    H, F, L = g.num_heads, g.head_dim // 2, g.num_layers
    group = H // g.num_kv_heads
    acc = torch.zeros(L, H, F, dtype=torch.float64)
    norm = torch.zeros(L, H, F, dtype=torch.float64)
    store: dict[tuple[int, str], Tensor] = {}

    def keep(x: Tensor, ctx) -> None:
        store[(ctx.layer, ctx.name.rsplit(".", 1)[1])] = x.detach()

    def weights(w: Tensor, ctx) -> None:  # w (1, H, r, Tk) for rows ctx.rows of this call
        s, e = ctx.rows
        q = store[(ctx.layer, "q")][0, :, s:e].double()               # (H, r, D)
        k = store[(ctx.layer, "k")][0].double().repeat_interleave(group, 0)  # (H, Tk, D)
        c = pair_contributions(q, k)                                   # (H, F, r, Tk)
        acc[ctx.layer] += torch.einsum("hij,hfij->hf", w[0].double(), c.abs())

    with hf.hooks(model, {"blocks.*.attn.q": keep, "blocks.*.attn.k": keep, "blocks.*.attn.weights": weights}):
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    for layer in range(L):
        q = store[(layer, "q")][0].double()
        k = store[(layer, "k")][0].double().repeat_interleave(group, 0)
        norm[layer] = pair_norms(q).mean(1) * pair_norms(k).mean(1)
    score_share = acc / acc.sum(-1, keepdim=True).clamp_min(1e-300)
    norm_share = norm / norm.sum(-1, keepdim=True).clamp_min(1e-300)
    return RopeUsage(score_share, norm_share, freqs, int(ids.shape[1]))


__all__ = ["RopeUsage", "inv_freqs", "pair_contributions", "pair_norms", "rope_usage"]
