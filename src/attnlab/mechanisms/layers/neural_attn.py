"""Neural Attention (paper L215): scores from a small feed-forward network over each query-key pair.

Per head, the dot product is replaced by a two-layer MLP of the concatenated pair:

    S_ij = w2 . act(W1 [q_i ; k_j] + b1)          A = softmax(S + mask)        out = A v

Fast path: the first layer is linear in the concatenation, so ``W1 [q; k] = W1q q + W1k k``: both halves are
computed once per token and only the activation and the second layer run per pair, ``chunk`` query rows at a
time (``chunk x Tk x hidden`` numbers live at once). Cost: ``O(T^2 * hidden)`` per head instead of
``O(T^2 * d)``. The second layer's bias is left out: it adds the same constant to every score of a row.

The op ``neural_attn`` takes the MLP as tensor options ``w1`` (H, n, 2d), ``b1`` (H, n), ``w2`` (H, n) (the layer
passes its learned ones). Parameter-free defaults (None): ``n = d``, ``W1 = [I ; I]``, ``b1 = 0``,
``w2 = 1 / sqrt(d)``, i.e. the additive score ``S_ij = sum_c gelu(q_ic + k_jc) / sqrt(d)`` (Bahdanau's form with
identity weights). ``scale`` is not used: the MLP sets the score's size. ``activation="tanh"`` with ``b1 = 0`` is
Luong's (and Bahdanau's) additive "concat" score ``v_a . tanh(W_a [q ; k])``: the ``luong`` layer runs this op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.core.softmax import masked_softmax
from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..heads import HeadsConfig, OpLayer
from ..registry import register
from ._scored import (
    allowed,
    by_rows,
    check_free_mask,
    dense_allowed,
    grouped_apply,
    per_head,
    repeat_kv,
)

ACTIVATIONS = {"gelu": F.gelu, "tanh": torch.tanh}


def _act(activation: str):
    if activation not in ACTIVATIONS:
        raise ValueError(f"op 'neural_attn': activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def _mlp(q: Tensor, w1: Tensor | None, b1: Tensor | None, w2: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The score MLP per head: w1 (H, n, 2d), b1 (H, n), w2 (H, n), defaults filled (see the module docstring)."""
    H, d = q.shape[1], q.shape[-1]
    n = w1.shape[1] if isinstance(w1, Tensor) and w1.dim() == 3 else d
    w1 = per_head("w1", w1, (H, n, 2 * d), q)
    b1 = per_head("b1", b1, (H, n), q)
    w2 = per_head("w2", w2, (H, n), q)
    if w1 is None:
        eye = torch.eye(d, dtype=q.dtype, device=q.device)
        w1 = torch.cat([eye, eye], dim=1).expand(H, d, 2 * d)
    b1 = torch.zeros(H, n, dtype=q.dtype, device=q.device) if b1 is None else b1
    w2 = torch.full((H, n), n**-0.5, dtype=q.dtype, device=q.device) if w2 is None else w2
    return w1, b1, w2


def _neural_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                      causal: bool = True, w1: Tensor | None = None, b1: Tensor | None = None,
                      w2: Tensor | None = None, activation: str = "gelu", chunk: int = 64) -> Tensor:
    """Float64: the MLP applied to the explicit concatenation ``[q_i ; k_j]`` of every pair, softmax over the allowed
    keys (zero rows when none)."""
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    qd, kd = q.double(), repeat_kv(k.double(), H)
    w1, b1, w2 = _mlp(qd, w1, b1, w2)
    pairs = torch.cat([qd[:, :, :, None, :].expand(B, H, Tq, Tk, d), kd[:, :, None, :, :].expand(B, H, Tq, Tk, d)],
                      dim=-1)  # (B, H, Tq, Tk, 2d)
    hidden = _act(activation)(torch.einsum("bhijc,hnc->bhijn", pairs, w1) + b1[None, :, None, None])
    s = torch.einsum("bhijn,hn->bhij", hidden, w2)
    ok = dense_allowed(Tq, Tk, q_offset, causal, mask, q.device).expand_as(s)
    s = s.masked_fill(~ok, -torch.inf)
    w = torch.softmax(s.masked_fill(~ok.any(-1, keepdim=True), 0.0), dim=-1) * ok.any(-1, keepdim=True)
    return w @ repeat_kv(v.double(), H)


@register_op("neural_attn", family="dense", papers=("L215",), summary="scores from a per-head MLP over concatenated "
             "query-key pairs", options={"causal": True, "w1": None, "b1": None, "w2": None, "activation": "gelu",
             "chunk": 64},
             reference=_neural_reference, example={"chunk": 7})
def neural_attn_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   state: dict | None = None, causal: bool = True, w1: Tensor | None = None, b1: Tensor | None = None,
                   w2: Tensor | None = None, activation: str = "gelu",
                   chunk: int = 64) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, d) at positions q_offset.. over k, v (B, Hkv, Tk, d) -> (B, H, Tq, Dv); the MLP's first layer
    is split into its query and key halves (computed once per token), ``chunk`` query rows at a time. Stateless."""
    positive_int("chunk", chunk)
    check_free_mask("neural_attn", mask, q, k)
    act = _act(activation)
    B, H, Tq, d = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    w1, b1, w2 = _mlp(q, w1, b1, w2)
    hq = torch.einsum("bhid,hnd->bhin", q, w1[..., :d]) + b1[None, :, None]  # (B, H, Tq, n)
    # key half per query head (heads sharing a kv head have their own w1)
    hk = torch.einsum("bgrjd,grnd->bgrjn", k.unsqueeze(2).expand(B, Hkv, H // Hkv, Tk, d),
                      w1[..., d:].reshape(Hkv, H // Hkv, -1, d)).reshape(B, H, Tk, -1)

    def rows(a: int, b: int) -> Tensor:
        h = act(hq[:, :, a:b, None, :] + hk[:, :, None, :, :])  # (B, H, rows, Tk, n)
        s = torch.einsum("bhijn,hn->bhij", h, w2)
        return grouped_apply(masked_softmax(s, allowed(a, b, Tk, q_offset, causal, mask, q.device)), v)

    out = by_rows(rows, Tq, chunk)
    return out if state is None else (out, state)


@dataclass(frozen=True)
class NeuralAttnConfig(HeadsConfig):
    dim: int = 64
    heads: int = 4
    rope: bool = True
    hidden: int = 16  # width of the score MLP
    chunk: int = 64  # query rows per block of the fast path

    fixed = ("kv_heads", "head_dim")

    def validate(self) -> None:
        positive_int("hidden", self.hidden)
        positive_int("chunk", self.chunk)


@register("neural_attn", family="layers", papers=("L215",), year=2025, config=NeuralAttnConfig,
          summary="scores from a per-head MLP over concatenated query-key pairs")
class NeuralAttention(OpLayer):
    """(B, T, dim) -> (B, T, dim): projections + the op ``neural_attn`` with the layer's learned score MLP."""

    op = "neural_attn"

    def __init__(self, cfg: NeuralAttnConfig) -> None:
        super().__init__(cfg)
        d, n = cfg.d, cfg.hidden
        self.w1 = nn.Parameter(torch.randn(cfg.heads, n, 2 * d) * (2 * d) ** -0.5)  # on [q ; k]
        self.b1 = nn.Parameter(torch.zeros(cfg.heads, n))
        self.w2 = nn.Parameter(torch.randn(cfg.heads, n) * n ** -0.5)

    def op_options(self) -> dict:
        return {**super().op_options(), "w1": self.w1, "b1": self.b1, "w2": self.w2}

    def reference(self, x: Tensor) -> Tensor:
        """The MLP applied to the explicit concatenation of every (query, key) pair."""
        q, k, v = self.project(x, 0)
        B, H, T, d = q.shape
        qi = q[:, :, :, None, :].expand(B, H, T, T, d)
        kj = k[:, :, None, :, :].expand(B, H, T, T, d)
        pairs = torch.cat([qi, kj], dim=-1)  # (B, H, T, T, 2d): [q_i ; k_j]
        hidden = F.gelu(torch.einsum("bhijc,hnc->bhijn", pairs, self.w1) + self.b1[None, :, None, None])
        s = torch.einsum("bhijn,hn->bhij", hidden, self.w2)
        if self.causal:
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return self.out(torch.softmax(s, dim=-1) @ v)
