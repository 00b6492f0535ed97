"""MoH: multi-head attention as a mixture of heads (L35, Jin et al. 2024).

Written as a sum, multi-head attention is ``O = sum_i H^i W_O^i``. MoH weights the sum per token ``t``:

    O_t = sum_i g_{t,i} H^i_t W_O^i
    g_{t,i} = a1 * softmax(W_s x_t)_i                              for the h_s shared heads (always on)
    g_{t,i} = a2 * softmax(W_r x_t)_i  if i is in the top-k of W_r x_t, else 0   for the routed heads
    (a1, a2) = softmax(W_h x_t)

and adds the load-balance loss over the routed heads ``L_b = sum_i f_i P_i`` (f_i: fraction of tokens that
select head i, P_i: mean router probability of head i), returned by ``forward_with_aux`` as
``aux["moh_balance"] = balance_coef * L_b``.

Fast path: a routed head computes its queries and output only for the tokens that chose it. Keys and values
stay all tokens (every token is a key for every head). Queries are processed in chunks of ``chunk``
positions; per chunk and head the selected queries are gathered (padded to the chunk's largest count) and
attend to the keys up to the chunk's last position with a mask built from their original positions. With
top-k of ``n_routed`` the attention work of the routed heads drops to about ``k / n_routed`` of dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ...core.patterns import Causal
from ...core.reference import reference_attention
from ...core.softmax import lse_merge
from ..common import apply_rope
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register
from .mha import head_slices


@dataclass(frozen=True)
class MoHConfig(HeadsConfig):
    """heads: all heads; shared_heads: always active (None: heads // 4, at least 1); active_heads: heads each
    token uses, shared included (None: heads // 2); balance_coef: weight of the load-balance loss;
    chunk: positions per chunk of the routed fast path."""

    rope: bool = True
    shared_heads: int | None = None
    active_heads: int | None = None
    qk_norm: bool = False
    balance_coef: float = 0.01
    chunk: int = 1024

    fixed = ("kv_heads",)  # every head has its own keys: a routed head is a whole head
    renamed = {"query_chunk": "chunk"}

    def validate(self) -> None:
        positive_int("chunk", self.chunk)
        if not 0 <= self.hs < self.heads:
            raise ValueError(f"shared_heads must be in [0, heads), got {self.hs} with heads={self.heads}")
        if not self.hs < self.active <= self.heads:
            raise ValueError(
                f"active_heads must be in (shared_heads, heads] = ({self.hs}, {self.heads}], got {self.active}"
            )

    @property
    def hs(self) -> int:
        return self.shared_heads if self.shared_heads is not None else max(1, self.heads // 4)

    @property
    def active(self) -> int:
        return self.active_heads if self.active_heads is not None else max(self.hs + 1, self.heads // 2)

    @property
    def top_k(self) -> int:
        return self.active - self.hs


@register(
    "moh",
    family="layers",
    papers=("L35",),
    year=2024,
    summary="mixture-of-head attention: shared heads + per-token top-k routed heads, weighted sum",
    config=MoHConfig,
)
class MoHAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim); ``forward_with_aux`` also returns ``{"moh_balance": loss}``. The shared heads
    run op ``sdpa``; the routed heads attend only for the tokens that chose them."""

    def __init__(self, cfg: MoHConfig) -> None:
        super().__init__(cfg, qk_norm=cfg.qk_norm)
        H = cfg.heads
        self.router_shared = nn.Linear(cfg.dim, cfg.hs, bias=False) if cfg.hs else None  # W_s
        self.router = nn.Linear(cfg.dim, H - cfg.hs, bias=False)  # W_r
        self.balance = nn.Linear(cfg.dim, 2, bias=False)  # W_h: shared vs routed

    # ---- routing ---------------------------------------------------------------------------------------
    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, dim) -> gates (B, T, H) (zeros for unselected routed heads), selected (B, T, H - hs) bool,
        router probabilities (B, T, H - hs)."""
        cfg = self.cfg
        a = torch.softmax(self.balance(x), dim=-1)
        probs = torch.softmax(self.router(x), dim=-1)
        top = probs.topk(cfg.top_k, dim=-1).indices
        selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)
        routed = a[..., 1:2] * probs * selected
        if cfg.hs:
            shared = a[..., 0:1] * torch.softmax(self.router_shared(x), dim=-1)
            return torch.cat([shared, routed], dim=-1), selected, probs
        return routed, selected, probs

    def balance_loss(self, selected: Tensor, probs: Tensor) -> Tensor:
        """sum_i f_i P_i over routed heads, f_i and P_i averaged over every token of the call."""
        f = selected.flatten(0, -2).to(probs.dtype).mean(0)
        P = probs.flatten(0, -2).mean(0)
        return (f * P).sum()

    # ---- attention -------------------------------------------------------------------------------------
    def forward_with_aux(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        q, k, v, start = self.qkv_cached(x, cache)
        g, selected, probs = self.gates(x)
        hs = cfg.hs
        outs = []
        if hs:
            outs.append(self.spec(q[:, :hs], k[:, :hs], v[:, :hs], scale=cfg.d**-0.5, q_offset=start,
                                  causal=cfg.causal))
        sel = selected.transpose(1, 2)  # (B, R, T)
        outs.append(routed_attention(q[:, hs:], k[:, hs:], v[:, hs:], sel, start, cfg.causal, cfg.chunk))
        o = torch.cat(outs, dim=1) * g.transpose(1, 2).unsqueeze(-1)  # weight each head's output
        aux = {"moh_balance": cfg.balance_coef * self.balance_loss(selected, probs)}
        return self.out(o), aux

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        return self.forward_with_aux(x, cache)[0]

    def reference(self, x: Tensor) -> Tensor:
        """Every head on every token (dense float scores), then O_t = sum_i g_{t,i} H^i_t W_O^i."""
        cfg = self.cfg
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        a = torch.softmax(x @ self.balance.weight.T, dim=-1)
        p_r = torch.softmax(x @ self.router.weight.T, dim=-1)
        kth = p_r.sort(dim=-1, descending=True).values[..., cfg.top_k - 1 : cfg.top_k]
        g_r = a[..., 1:2] * p_r * (p_r >= kth)
        g = g_r
        if cfg.hs:
            g = torch.cat([a[..., 0:1] * torch.softmax(x @ self.router_shared.weight.T, dim=-1), g_r], dim=-1)
        Wq, Wk, Wv = (head_slices(p.weight, cfg.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        Wo = self.o_proj.weight.T.chunk(cfg.heads, dim=0)
        out = x.new_zeros(B, T, cfg.dim)
        for i in range(cfg.heads):
            q, k, v = ((x @ W[i])[:, None] for W in (Wq, Wk, Wv))
            if cfg.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if cfg.rope:
                q, k = apply_rope(q, pos, cfg.rope_base), apply_rope(k, pos, cfg.rope_base)
            h = reference_attention(q, k, v, Causal() if cfg.causal else None, dtype=None)[:, 0]
            out = out + g[..., i : i + 1] * (h @ Wo[i])
        return out

    def state_size(self, seq_len: int) -> int:
        return 2 * self.cfg.heads * self.cfg.d * seq_len


def routed_attention(
    q: Tensor, k: Tensor, v: Tensor, sel: Tensor, q_offset: int, causal: bool, chunk: int
) -> Tensor:
    """Attention computed only for the (query, head) pairs that are selected.

    q: (B, R, Tq, d) queries at absolute positions q_offset..; k, v: (B, R, Tk, d) (every key);
    sel: (B, R, Tq) bool, True where the token routes to the head. Returns (B, R, Tq, d), zero where
    unselected. Work: per chunk of ``chunk`` positions, (most selections of a head in the chunk) x (keys up to
    the chunk's last position).
    """
    B, R, Tq, d = q.shape
    Tk = k.shape[2]
    pieces, dests = [], []
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        s = sel[:, :, c0:c1]
        n = int(s.sum(-1).max())
        if n == 0:
            continue
        # selected rows first, in position order (stable sort); padding rows are real but unselected rows
        order = torch.sort((~s).to(torch.uint8), dim=-1, stable=True).indices[..., :n]
        valid = torch.gather(s, -1, order)
        rows = order + c0  # (B, R, n) call-relative rows
        qg = torch.gather(q, 2, rows.unsqueeze(-1).expand(B, R, n, d))
        kc = min(Tk, q_offset + c1) if causal else Tk
        lo = min(q_offset + c0, kc) if causal else kc  # every query of the chunk sees keys [0, lo)
        mask = None
        if lo < kc:  # keys [lo, kc) need the position test: a small additive mask
            later = torch.arange(lo, kc, device=q.device) > (rows + q_offset).unsqueeze(-1)  # (B, R, n, kc - lo)
            mask = torch.where(later, float("-inf"), 0.0).to(q.dtype)
        if mask is None:
            o = F.scaled_dot_product_attention(qg, k[:, :, :kc], v[:, :, :kc])
        elif lo == 0:
            o = F.scaled_dot_product_attention(qg, k[:, :, :kc], v[:, :, :kc], attn_mask=mask)
        elif q.device.type == "cpu":
            o = TwoPartAttention.apply(qg, k[:, :, :lo], v[:, :, :lo], k[:, :, lo:kc], v[:, :, lo:kc], mask, d**-0.5)
        else:
            full = torch.cat([mask.new_zeros(B, R, n, lo), mask], dim=-1)
            o = F.scaled_dot_product_attention(qg, k[:, :, :kc], v[:, :, :kc], attn_mask=full)
        pieces.append(o)
        dests.append(torch.where(valid, rows, Tq))  # padding goes to a discarded slot
    out = q.new_zeros(B, R, Tq + 1, v.shape[-1])
    if pieces:
        o, dest = torch.cat(pieces, dim=2), torch.cat(dests, dim=2)
        out = out.scatter(2, dest.unsqueeze(-1).expand_as(o), o)
    return out[:, :, :Tq]



_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class TwoPartAttention(torch.autograd.Function):
    """softmax attention over the union of two key sets, run as two calls of the CPU flash kernel.

    Part A (keys ka, va) has no mask; part B (kb, vb) an additive float mask. Forward merges the two partial
    outputs by their log-sum-exps; backward gives each part the merged output and log-sum-exp, which is what
    the kernel's backward needs to produce exact gradients of the whole softmax. So the large unmasked part
    never materializes a mask. q (B, H, n, d); ka, va (B, H, La, d); kb, vb (B, H, Lb, d); mask (B, H, n, Lb).
    """

    @staticmethod
    def forward(ctx, q, ka, va, kb, vb, mask, scale):
        oa, la = _flash(q, ka, va, 0.0, False, attn_mask=None, scale=scale)
        ob, lb = _flash(q, kb, vb, 0.0, False, attn_mask=mask, scale=scale)
        out, lse = lse_merge([(oa, la), (ob, lb)])  # the one merge over disjoint key sets
        ctx.save_for_backward(q, ka, va, kb, vb, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, ka, va, kb, vb, mask, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dqa, dka, dva = _flash_bwd(grad, q, ka, va, out, lse, 0.0, False, attn_mask=None, scale=ctx.scale)
        dqb, dkb, dvb = _flash_bwd(grad, q, kb, vb, out, lse, 0.0, False, attn_mask=mask, scale=ctx.scale)
        return dqa + dqb, dka, dva, dkb, dvb, None, None
