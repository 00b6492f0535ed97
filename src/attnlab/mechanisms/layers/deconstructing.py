"""Deconstructing Attention's controlled variants (L2, "Deconstructing Attention: Investigating Design Principles
for Effective Language Modeling").

Softmax dot-product attention interweaves four principles; each variant relaxes one of them and keeps the rest
(value and output projections, heads, the causal rule). Per head, with ``v_j = x_j W_V``, ``out = concat(o) W_O``:

* ``no_mixing`` (mixing across positions): ``o_i = v_i`` -- each token attends only to itself (weights = I).
* ``input_independent`` (sequence-dependent weights): a learned ``max_len x max_len`` logit matrix ``M_h`` per
  head, ``o_i = sum_j softmax_j(M_h[i, j]) v_j`` over the keys ``i`` may see (``j <= i`` when causal, ``j < T``
  otherwise): the same mixing for every input.
* ``l2_distance`` (the dot-product form): scores ``-||q_i - k_j||^2 / sqrt(d)`` instead of ``q_i . k_j / sqrt(d)``,
  then the usual softmax.
* ``decoupled_qk`` (queries/keys tied to the current hidden state): ``q_i = p_i W_Q``, ``k_j = p_j W_K`` from a
  learned position embedding table ``p`` (``max_len x dim``) only; the values still come from ``x``.

Fast paths: ``l2_distance`` runs the fused dot-product op on augmented vectors, using
``-||q - k||^2 = 2 q.k - ||k||^2 - ||q||^2`` where ``||q_i||^2`` is constant along a row and cancels in the
softmax: ``q' = [2q, -1]``, ``k' = [k, ||k||^2]`` (values padded with a zero column so the widths match the fused
kernel). ``decoupled_qk`` is plain ``sdpa`` on position-made q and k; ``input_independent`` slices ``M`` for the
call's rows and keys; ``no_mixing`` is the value path. RoPE (``rope``) rotates q and k where they exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ..common import split_heads
from ..heads import HeadsConfig, OpLayer, one_of
from ..registry import register

VARIANTS = ("no_mixing", "input_independent", "l2_distance", "decoupled_qk")


@dataclass(frozen=True)
class DeconstructingConfig(HeadsConfig):
    """variant: which principle is relaxed (one of ``VARIANTS``); max_len: longest sequence (the size of the
    learned mixing matrix of ``input_independent`` and of the position table of ``decoupled_qk``)."""

    rope: bool = True
    variant: str = "l2_distance"
    max_len: int = 1024

    fixed = ("kv_heads",)

    def validate(self) -> None:
        one_of("variant", self.variant, VARIANTS)
        positive_int("max_len", self.max_len)


@register(
    "deconstructing",
    family="layers",
    papers=("L2",),
    year=2025,
    summary="attention with one principle relaxed: no mixing, input-independent mixing, L2 scores, position-only q/k",
    config=DeconstructingConfig,
)
class DeconstructedAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim). Variants with q and k (``l2_distance``, ``decoupled_qk``) run op ``sdpa``;
    ``input_independent`` caches values only; ``no_mixing`` caches nothing."""

    def __init__(self, cfg: DeconstructingConfig) -> None:
        has_qk = cfg.variant in ("l2_distance", "decoupled_qk")
        super().__init__(cfg, proj="qkvo" if has_qk else "vo")
        if cfg.variant == "input_independent":
            # zero logits: a uniform average over the visible keys at initialization
            self.mix = nn.Parameter(torch.zeros(cfg.heads, cfg.max_len, cfg.max_len))
        if cfg.variant == "decoupled_qk":
            self.pos = nn.Parameter(0.02 * torch.randn(cfg.max_len, cfg.dim))

    @property
    def op(self) -> str | None:  # type: ignore[override]
        return "sdpa" if self.cfg.variant in ("l2_distance", "decoupled_qk") else None

    @property
    def kv_cache(self) -> bool:  # type: ignore[override]
        return self.cfg.variant != "no_mixing"

    def op_options(self) -> dict[str, Any]:
        return {"causal": self.cfg.causal}

    def _check_len(self, end: int) -> None:
        if self.cfg.variant in ("input_independent", "decoupled_qk") and end > self.cfg.max_len:
            raise ValueError(f"deconstructing ({self.cfg.variant}): positions up to {end - 1} exceed max_len "
                             f"{self.cfg.max_len}; build with a larger max_len")

    def project(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) at positions ``start..`` -> q (B, H, T, d), k (B, H, T, d or 0), v (B, H, T, d).
        Variants without queries return v as q and a zero-width k (the cache then holds values only)."""
        cfg = self.cfg
        self._check_len(start + x.shape[1])
        v = split_heads(self.v_proj(x), cfg.heads)
        if cfg.variant in ("no_mixing", "input_independent"):
            return v, v[..., :0], v
        src = x if cfg.variant == "l2_distance" else self.pos[start : start + x.shape[1]].expand_as(x)
        q, k = split_heads(self.q_proj(src), cfg.heads), split_heads(self.k_proj(src), cfg.heads)
        if cfg.rope:
            q, k = self.rotate(q, start), self.rotate(k, start)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int, state: Any) -> Tensor:
        cfg = self.cfg
        if cfg.variant == "no_mixing":
            return v  # the new positions' own values
        if cfg.variant == "input_independent":
            Tq, Tk = q.shape[2], v.shape[2]
            logits = self.mix[:, q_offset : q_offset + Tq, :Tk].to(v.dtype)  # (H, Tq, Tk)
            if cfg.causal:
                rows = torch.arange(q_offset, q_offset + Tq, device=v.device).view(-1, 1)
                logits = logits.masked_fill(torch.arange(Tk, device=v.device) > rows, float("-inf"))
            return torch.einsum("hqk,bhkd->bhqd", torch.softmax(logits, dim=-1), v)
        if cfg.variant == "l2_distance":
            one = q.new_ones(q.shape[:-1] + (1,))
            q = torch.cat([2 * q, -one], dim=-1)
            k = torch.cat([k, k.pow(2).sum(-1, keepdim=True)], dim=-1)
            d = v.shape[-1]
            v = torch.cat([v, v.new_zeros(v.shape[:-1] + (1,))], dim=-1)
            return self.spec(q, k, v, scale=cfg.d**-0.5, q_offset=q_offset, causal=cfg.causal)[..., :d]
        return self.spec(q, k, v, scale=cfg.d**-0.5, q_offset=q_offset, causal=cfg.causal)

    def reference(self, x: Tensor) -> Tensor:
        """Dense, head by head, from the formulas: weights W (T, T) per variant, o = W v, out = concat(o) W_O."""
        cfg = self.cfg
        B, T, _ = x.shape
        self._check_len(T)
        H, d = cfg.heads, cfg.d
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
        if cfg.causal:
            allowed = allowed.tril()
        v = (x @ self.v_proj.weight.T).view(B, T, H, d)
        if cfg.variant in ("l2_distance", "decoupled_qk"):
            src = x if cfg.variant == "l2_distance" else self.pos[:T].unsqueeze(0).expand(B, T, cfg.dim)
            q = (src @ self.q_proj.weight.T).view(B, T, H, d).transpose(1, 2)
            k = (src @ self.k_proj.weight.T).view(B, T, H, d).transpose(1, 2)
            if cfg.rope:
                q, k = self.rotate(q, 0), self.rotate(k, 0)
        heads = []
        for h in range(H):
            if cfg.variant == "no_mixing":
                w = torch.eye(T, dtype=x.dtype, device=x.device).expand(B, T, T)
            else:
                if cfg.variant == "input_independent":
                    s = self.mix[h, :T, :T].to(x.dtype).expand(B, T, T)
                elif cfg.variant == "l2_distance":
                    diff = q[:, h, :, None, :] - k[:, h, None, :, :]  # (B, T, T, d)
                    s = -diff.pow(2).sum(-1) / d**0.5
                else:
                    s = q[:, h] @ k[:, h].transpose(-1, -2) / d**0.5
                e = torch.exp(s - s.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)) * allowed
                w = e / e.sum(-1, keepdim=True)
            heads.append(w @ v[:, :, h])
        return torch.cat(heads, dim=-1) @ self.o_proj.weight.T

    def state_size(self, seq_len: int) -> int:
        """Numbers cached per sequence: none (no_mixing), values (input_independent), keys and values."""
        per = {"no_mixing": 0, "input_independent": 1}.get(self.cfg.variant, 2)
        return per * self.cfg.heads * self.cfg.d * seq_len
