"""Dual attention: sensory and relational heads in one layer (L157, "Disentangling and Integrating Relational and
Sensory Information in Transformer Architectures", Altabaa et al.).

Every head computes its attention weights the usual way, ``alpha^h_ij = softmax_j(<W_q^h x_i, W_k^h x_j> / sqrt(d))``
(causal-masked when ``causal``), and the heads differ in what they retrieve:

* sensory head (standard attention): ``o^h_i = sum_j alpha^h_ij W_v^h x_j``;
* relational head: ``o^h_i = sum_j alpha^h_ij (r(x_i, x_j) W_r^h + s_j W_s^h)`` with the relation vector
  ``r(x_i, x_j) = (<W_q1^l x_i, W_k1^l x_j>)_{l = 1..d_r}`` (one inner product of learned feature maps per relation,
  shared by the relational heads) and ``s_j`` the symbol of position ``j``;

and ``out = concat(o^1, ..., o^H) W_O`` (sensory heads first, one output projection for both kinds).
``heads`` counts all heads, ``relational_heads`` the relational ones (default ``heads // 2``), the rest are sensory.

Choices where the paper leaves one (documented in docs/mechanisms/layers.md):

* symbols: positional symbols of width ``dim``, ``symbols="learned"`` (default: a ``max_len x dim`` table, N(0, 1)
  init, like the paper's positional symbol retriever) or ``"sinusoidal"`` (fixed: ``[sin(p w_f), cos(p w_f)]``,
  ``w_f = 10000^(-2f/e)``, ``e`` = dim rounded up to even, the first ``dim`` channels; no length limit);
* each relation's feature maps ``W_q1^l, W_k1^l`` have width ``d`` (the head width); relations are not scaled;
* RoPE (``rope``, default on) rotates the attention queries and keys of both kinds of heads (the sensory heads'
  only source of position); relations stay content-only, position enters the relational heads through symbols.

Fast path: never forms the ``(B, T, T, d_r)`` relation tensor. With ``a^l_i = W_q1^l x_i``, ``b^l_j = W_k1^l x_j``,

    sum_j alpha_ij <a^l_i, b^l_j> = <a^l_i, sum_j alpha_ij b^l_j>,

so a relational head is an ordinary attention op over the values ``u_j = [b^1_j, ..., b^{d_r}_j, s_j]`` (width
``d_r d + dim``, the same for every relational head), then a dot product of each retrieved ``b^l`` with the query's
own ``a^l``, then ``W_r`` and ``W_s`` (linear, so applied after the weighted sum). Both kinds of heads run through
the op seam (op ``sdpa``). The decoding cache is one ``KVCache``: the keys of all heads and, as one key/value head,
the packed values ``[v_sensory, b, s]`` per position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import nonneg_int, positive_int
from ..base import check_hidden
from ..common import apply_rope, split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer, one_of
from ..registry import register
from .rcmha import sinusoid

SYMBOLS = ("learned", "sinusoidal")


@dataclass(frozen=True)
class DualAttnConfig(HeadsConfig):
    """heads: all heads, sensory and relational; relational_heads: how many are relational (None: ``heads // 2``;
    the other ``heads - relational_heads`` are sensory); rel_dim: ``d_r``, relations per pair of positions;
    symbols: the positional symbols ``s_j`` (``"learned"`` table or fixed ``"sinusoidal"``, width ``dim``);
    max_len: longest sequence with learned symbols (the table's rows)."""

    rope: bool = True
    relational_heads: int | None = None
    rel_dim: int = 8
    symbols: str = "learned"
    max_len: int = 1024

    fixed = ("kv_heads",)

    def validate(self) -> None:
        if self.relational_heads is None:
            self.set("relational_heads", self.heads // 2)
        nonneg_int("relational_heads", self.relational_heads)
        if self.relational_heads > self.heads:
            raise ValueError(f"relational_heads ({self.relational_heads}) must be at most heads ({self.heads})")
        positive_int("rel_dim", self.rel_dim)
        one_of("symbols", self.symbols, SYMBOLS)
        positive_int("max_len", self.max_len)

    @property
    def sensory_heads(self) -> int:
        return self.heads - self.relational_heads


@register(
    "dual_attn",
    family="layers",
    papers=("L157",),
    year=2024,
    summary="sensory heads (softmax attention) + relational heads retrieving relations r(x_i, x_j) and symbols",
    config=DualAttnConfig,
)
class DualAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim). Parameters: ``W_Q, W_K`` (all heads), ``W_V`` (sensory heads only),
    ``rel_q_proj, rel_k_proj`` (``dim -> d_r d``: the feature maps ``W_q1^l, W_k1^l`` stacked), ``w_r``
    ``(H_r, d_r, d)`` and ``w_s`` ``(H_r, dim, d)`` (a relational head ``h`` adds ``r w_r[h] + s w_s[h]``), the symbol
    table ``symbols`` ``(max_len, dim)`` (learned symbols) and ``W_O``. Op ``sdpa`` for both kinds of heads."""

    length_option = "max_len"  # the config option bounding the sequence length (benchmarks size it)

    def __init__(self, cfg: DualAttnConfig) -> None:
        super().__init__(cfg, proj="qko")
        dim, d, R, Hs, Hr = cfg.dim, cfg.d, cfg.rel_dim, cfg.sensory_heads, cfg.relational_heads
        self.v_proj = nn.Linear(dim, Hs * d, bias=False) if Hs else None
        self.rel_q_proj = nn.Linear(dim, R * d, bias=False) if Hr else None  # a^l_i = W_q1^l x_i
        self.rel_k_proj = nn.Linear(dim, R * d, bias=False) if Hr else None  # b^l_j = W_k1^l x_j
        self.w_r = nn.Parameter(torch.empty(Hr, R, d).uniform_(-(R**-0.5), R**-0.5)) if Hr else None
        self.w_s = nn.Parameter(torch.empty(Hr, dim, d).uniform_(-(dim**-0.5), dim**-0.5)) if Hr else None
        learned = Hr and cfg.symbols == "learned"
        self.symbols = nn.Parameter(torch.randn(cfg.max_len, dim)) if learned else None

    def _check_len(self, end: int) -> None:
        cfg = self.cfg
        if cfg.relational_heads and cfg.symbols == "learned" and end > cfg.max_len:
            raise ValueError(f"dual_attn: positions up to {end - 1} exceed max_len {cfg.max_len} (learned symbols); "
                             "build with a larger max_len or symbols='sinusoidal'")

    def symbol(self, start: int, n: int, like: Tensor) -> Tensor:
        """Symbols ``s_j`` of positions ``start .. start + n - 1``: (n, dim) in ``like``'s dtype."""
        cfg = self.cfg
        self._check_len(start + n)
        if cfg.symbols == "learned":
            return self.symbols[start : start + n].to(like.dtype)
        pos = torch.arange(start, start + n, dtype=torch.float64, device=like.device)
        return sinusoid(pos, cfg.dim + cfg.dim % 2)[:, : cfg.dim].to(like.dtype)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x (B, T, dim) at positions ``cache.length ..`` (0 without a cache) -> (B, T, dim)."""
        cfg = self.cfg
        start = self.check_cache(x, cache)
        B, T, _ = x.shape
        H, Hs, Hr, d, R = cfg.heads, cfg.sensory_heads, cfg.relational_heads, cfg.d, cfg.rel_dim
        self._check_len(start + T)
        q, k = split_heads(self.q_proj(x), H), split_heads(self.k_proj(x), H)
        if cfg.rope:
            q, k = self.rotate(q, start), self.rotate(k, start)
        # the values of every head packed as one key/value head: [v of the sensory heads, b^1..b^{d_r}, s]
        parts = [self.v_proj(x)] if Hs else []
        if Hr:
            a = self.rel_q_proj(x).view(B, T, R, d)  # query-side feature maps a^l_i (new rows only)
            parts += [self.rel_k_proj(x), self.symbol(start, T, x).expand(B, T, cfg.dim)]
        v = torch.cat(parts, dim=-1).unsqueeze(1)  # (B, 1, T, Hs d + [d_r d + dim])
        if cache is not None:
            k, v = cache.kv.append(k, v)
        Tk = k.shape[2]
        heads = []
        if Hs:
            vs = v[:, 0, :, : Hs * d].unflatten(-1, (Hs, d)).transpose(1, 2)  # (B, Hs, Tk, d)
            heads.append(self.attend(q[:, :Hs], k[:, :Hs], vs, start, None))
        if Hr:
            # the relational retrieval is an ordinary attention op: sum_j alpha_ij u_j, u_j = [b_j, s_j]
            u = self.attend(q[:, Hs:], k[:, Hs:], v[..., Hs * d :].expand(B, Hr, Tk, -1), start, None)
            rel = torch.einsum("bhtlf,btlf->bhtl", u[..., : R * d].unflatten(-1, (R, d)), a)  # sum_j alpha r_ij
            heads.append(torch.einsum("bhtl,hlf->bhtf", rel, self.w_r.to(u.dtype))
                         + torch.einsum("bhte,hef->bhtf", u[..., R * d :], self.w_s.to(u.dtype)))
        return self.out(torch.cat(heads, dim=1))

    def reference(self, x: Tensor) -> Tensor:
        """The formula in float64 with the explicit ``(B, T, T, d_r)`` relations, head by head:
        ``alpha = softmax(mask(q k^T / sqrt(d)))``, sensory ``alpha V``, relational
        ``sum_j alpha_ij (r(x_i, x_j) W_r + s_j W_s)``, then ``concat W_O``. Returns x's dtype."""
        cfg = self.cfg
        check_hidden(x, cfg.dim)
        B, T, _ = x.shape
        H, Hs, d, R = cfg.heads, cfg.sensory_heads, cfg.d, cfg.rel_dim
        f64 = torch.float64
        X = x.to(f64)
        pos = torch.arange(T, device=x.device)
        Wq = self.q_proj.weight.to(f64).view(H, d, cfg.dim)
        Wk = self.k_proj.weight.to(f64).view(H, d, cfg.dim)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device)
        if cfg.causal:
            allowed = allowed.tril()
        if cfg.relational_heads:
            A = (X @ self.rel_q_proj.weight.to(f64).T).view(B, T, R, d)  # W_q1^l x_i
            Bk = (X @ self.rel_k_proj.weight.to(f64).T).view(B, T, R, d)  # W_k1^l x_j
            r = torch.einsum("bild,bjld->bijl", A, Bk)  # (B, T, T, d_r): r(x_i, x_j)
            S = self.symbol(0, T, X)  # (T, dim)
        heads = []
        for h in range(H):
            q, k = X @ Wq[h].T, X @ Wk[h].T  # (B, T, d)
            if cfg.rope:
                q = apply_rope(q[:, None], pos, cfg.rope_base)[:, 0]
                k = apply_rope(k[:, None], pos, cfg.rope_base)[:, 0]
            scores = (q @ k.transpose(-1, -2) * d**-0.5).masked_fill(~allowed, float("-inf"))
            alpha = torch.softmax(scores, dim=-1)  # (B, T, T); the diagonal is always allowed
            if h < Hs:
                heads.append(alpha @ (X @ self.v_proj.weight.to(f64)[h * d : (h + 1) * d].T))
            else:
                g = h - Hs
                msg = r @ self.w_r[g].to(f64) + S @ self.w_s[g].to(f64)  # (B, T, T, d): W_r r_ij + W_s s_j
                heads.append(torch.einsum("bij,bijf->bif", alpha, msg))
        return (torch.cat(heads, dim=-1) @ self.o_proj.weight.to(f64).T).to(x.dtype)

    def state_size(self, seq_len: int) -> int:
        """Numbers cached per position: keys of every head (``H d``), sensory values (``H_s d``) and, with
        relational heads, the key-side feature maps and the symbol (``d_r d + dim``)."""
        cfg = self.cfg
        per = cfg.heads * cfg.d + cfg.sensory_heads * cfg.d
        if cfg.relational_heads:
            per += cfg.rel_dim * cfg.d + cfg.dim
        return per * seq_len
