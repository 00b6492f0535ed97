"""Adaptive attention with a sentinel (paper L246, "Knowing When to Look") as a learned sink for any layer.

The paper lets the decoder attend either to the image regions or to a "visual sentinel" -- a gated memory
vector -- in one softmax, so the sentinel's weight ``beta_t`` says how much the step relies on what it already
knows instead of looking. Here the sentinel is a learned key/value pair per head, prepended to every query's
keys, whose value is gated per query by the hidden state:

    s_t^v = sigmoid(W_g x_t) * v_s                      (the sentinel's value for query t, per head)
    [alpha_t, beta_t] = softmax([q_t k_j / sqrt(d) for visible j ; q_t k_s / sqrt(d)])
    out_t = sum_j alpha_tj v_j + beta_t s_t^v

Fast path: SDPA over the keys with ``k_s`` prepended and the values widened by one channel that is 1 for the
sentinel and 0 elsewhere, so the same call returns ``beta_t``; the query-dependent gate is applied afterwards.
Deviation: the paper scores the sentinel with an additive MLP of the LSTM state; here it is a dot product
with a learned key, so it shares the attention kernel.

The op ``sentinel`` takes the sink as tensor options: ``sink_key`` (H, d) and ``sink_value`` (H, Dv) or per query
(B, H, Tq, Dv) (the layer passes its learned key and the gated value of each query). Parameter-free defaults
(None): a zero key and a zero value, i.e. a null sink with score 0 that only absorbs weight
(``out = sum_j e^{s_j} v_j / (1 + sum_j e^{s_j})``, "softmax plus one"). A free mask restricts the context keys;
the sink is always visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnlab.core.attention import attention
from attnlab.core.patterns import Causal, Full
from attnlab.ops.registry import register_op

from ..common import split_heads
from ..heads import HeadsConfig, OpLayer
from ..registry import register
from ._scored import check_free_mask, dense_allowed, per_head, repeat_kv


def _sink(q: Tensor, v: Tensor, sink_key: Tensor | None, sink_value: Tensor | None) -> tuple[Tensor, Tensor]:
    """The sink key (H, d) and value (B|1, H, Tq|1, Dv), defaults filled (zeros)."""
    B, H, Tq, d = q.shape
    Dv = v.shape[-1]
    ks = per_head("sink_key", sink_key, (H, d), q)
    ks = q.new_zeros(H, d) if ks is None else ks
    if sink_value is None:
        vs = v.new_zeros(1, H, 1, Dv)
    elif isinstance(sink_value, Tensor) and sink_value.dim() == 2:
        vs = per_head("sink_value", sink_value, (H, Dv), v)[None, :, None, :]
    else:
        vs = per_head("sink_value", sink_value, (B, H, Tq, Dv), v)
    return ks, vs


def _sentinel_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int,
                        mask: Tensor | None = None, causal: bool = True, sink_key: Tensor | None = None,
                        sink_value: Tensor | None = None) -> Tensor:
    """Float64: one softmax over [allowed keys ; sink] with the weights materialized; out = alpha v + beta v_s."""
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    qd = q.double()
    ks, vs = _sink(qd, v.double(), sink_key, sink_value)
    s = torch.einsum("bhid,bhjd->bhij", qd, repeat_kv(k.double(), H)) * scale
    ok = dense_allowed(Tq, Tk, q_offset, causal, mask, q.device).expand_as(s)
    s = s.masked_fill(~ok, -torch.inf)
    s_sink = torch.einsum("bhid,hd->bhi", qd, ks)[..., None] * scale
    w = torch.softmax(torch.cat([s, s_sink], dim=-1), dim=-1)
    return w[..., :Tk] @ repeat_kv(v.double(), H) + w[..., Tk:] * vs


@register_op("sentinel", family="dense", papers=("L246",), summary="a sink key/value every query may attend to "
             "instead of the context (learned and gated per query in the layer; a null sink by default)",
             options={"causal": True, "sink_key": None, "sink_value": None}, reference=_sentinel_reference)
def sentinel_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                state: dict | None = None, causal: bool = True, sink_key: Tensor | None = None,
                sink_value: Tensor | None = None) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, d) at positions q_offset.. over k, v (B, Hkv, Tk, d) -> (B, H, Tq, Dv). One attention call over
    the keys with the sink prepended; values widened by a channel that is 1 for the sink only, so the same call
    returns the sink's weight ``beta``, which then scales the (per-query) sink value. Stateless."""
    check_free_mask("sentinel", mask, q, k)
    B, H, Tq, d = q.shape
    Dv = v.shape[-1]
    ks, vs = _sink(q, v, sink_key, sink_value)
    if k.shape[1] != H:  # the sink key is per query head
        k, v = repeat_kv(k, H), repeat_kv(v, H)
    k_aug = torch.cat([ks.to(k.dtype)[None, :, None, :].expand(B, H, 1, d), k], dim=2)
    one = torch.cat([v.new_zeros(B, H, 1, Dv), v.new_ones(B, H, 1, 1)], dim=-1)
    v_aug = torch.cat([one, torch.cat([v, v.new_zeros(*v.shape[:3], 1)], dim=-1)], dim=2)
    if mask is not None:  # the sink (key 0) is always visible
        mask = torch.cat([mask.new_ones(*mask.shape[:3], 1), mask], dim=-1)
    # the sink sits at index 0: the query at position p sees it and the keys <= p (offset one more)
    o = attention(q, k_aug, v_aug, Causal() if causal else Full(), scale=scale, q_offset=q_offset + 1, mask=mask)
    out = o[..., :Dv] + o[..., Dv:] * vs
    return out if state is None else (out, state)


class Sentinel(nn.Module):
    """A learned key/value sink per head with a per-query gate: the ``sentinel`` op's options."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        d = dim // heads
        self.heads = heads
        self.key = nn.Parameter(torch.randn(heads, d) * d ** -0.5)
        self.value = nn.Parameter(torch.zeros(heads, d))
        self.gate = nn.Linear(dim, dim)

    def gated_value(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> the sentinel value per query, (B, H, T, d)."""
        return torch.sigmoid(split_heads(self.gate(x), self.heads)) * self.value[None, :, None, :]

    def reference(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, causal: bool) -> Tensor:
        """Plain softmax over [keys ; sentinel] with the weights materialized (q, k, v from position 0)."""
        T = k.shape[2]
        s = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
        if causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        s_sent = torch.einsum("bhid,hd->bhi", q, self.key)[..., None] / q.shape[-1] ** 0.5
        w = torch.softmax(torch.cat([s, s_sent], dim=-1), dim=-1)
        alpha, beta = w[..., :T], w[..., T:]
        return alpha @ v + beta * self.gated_value(x)


@dataclass(frozen=True)
class SentinelConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True

    fixed = ("kv_heads", "head_dim")


@register("sentinel", family="layers", papers=("L246",), year=2017, config=SentinelConfig,
          summary="learned gated sentinel key/value every query may attend to instead of the context")
class SentinelAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): projections + the op ``sentinel`` with the learned sink key and gated value."""

    op = "sentinel"

    def __init__(self, cfg: SentinelConfig) -> None:
        super().__init__(cfg)
        self.sentinel = Sentinel(cfg.dim, cfg.heads)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """x: (B, T, dim) -> (B, T, dim)."""
        q, k, v, start = self.qkv_cached(x, cache)
        opts = {**self.op_options(), "sink_key": self.sentinel.key, "sink_value": self.sentinel.gated_value(x)}
        return self.out(self.spec(q, k, v, scale=self.head_dim ** -0.5, q_offset=start, **opts))

    def reference(self, x: Tensor) -> Tensor:
        q, k, v = self.project(x, 0)
        return self.out(self.sentinel.reference(q, k, v, x, self.causal))
