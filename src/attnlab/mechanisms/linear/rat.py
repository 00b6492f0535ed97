"""RAT (R15): a linear recurrence inside chunks, softmax attention across chunk summaries.

The sequence is cut into chunks of ``L`` tokens. Inside a chunk, keys and values run a gated linear recurrence
that restarts at every chunk: ``h_t = f_t * h_{t-1} + (1 - f_t) * x_t`` with a per-channel forget gate
``f_t = sigmoid(X_t W_f)`` (shared by keys and values). Query ``t`` then attends, with softmax, to the final
recurrent key/value of every earlier chunk and to the current chunk's recurrent key/value at ``t``:

    o_t = softmax_j(q_t . k~_j / sqrt d) v~_j  over  j in {ends of chunks before t's chunk} + {t}

``L`` is the dial: ``L = 1`` is softmax attention, ``L = T`` a pure recurrence. Decoding keeps one summary per
finished chunk plus the running in-chunk state: ``2 * dim * (T // L + 1)`` numbers (grows as ``T / L``).

Not an op (``op = None``): the core is not a function of q, k, v. The forget gate ``f_t`` is computed from the
hidden state ``X_t`` (a ``dim x dim`` projection, not a small per-head parameter), and what a query attends is the
recurrence's chunk summaries, not the projected keys and values, so neither a KV cache nor a q/k/v state can
carry it; the layer keeps its own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...core.checks import positive_int
from ..common import split_heads
from ..heads import LayerCache
from ..registry import register
from ._common import LINEAR_FIXED, LinearHeadsConfig, LinearLayer


@dataclass(frozen=True)
class RATConfig(LinearHeadsConfig):
    """block: the chunk length L (16 in the paper). mode: chunked (vectorized) | recurrent (token by token) |
    parallel (the dense masked form)."""

    block: int = 16

    fixed = (*LINEAR_FIXED, "chunk")
    renamed = {"rat_chunk": "block", "chunk_size": "chunk"}

    def validate(self) -> None:
        super().validate()
        positive_int("block", self.block)


@register(
    "rat",
    family="linear",
    papers=("R15",),
    year=2025,
    summary="RAT: gated recurrence inside chunks of L tokens, softmax attention over chunk summaries",
    config=RATConfig,
)
class RATAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim); O(T^2 / L) attention, decoding state ``2 * dim * (T // L + 1)``."""

    op = None  # the recurrence and the chunk-summary softmax are the layer's own code
    kv_cache = False

    def __init__(self, cfg: RATConfig) -> None:
        super().__init__(cfg)
        self.f_proj = nn.Linear(cfg.dim, cfg.dim)

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x)
        return q, split_heads(torch.sigmoid(self.f_proj(x)), self.heads), k, v

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        self.check_cache(x, cache)
        if self.cfg.mode == "parallel" and cache is None:
            return self.reference(x)
        if self.cfg.mode == "recurrent" and cache is None:
            c = self.init_cache(x.shape[0])
            return torch.cat([self._step(x[:, t : t + 1], c) for t in range(x.shape[1])], dim=1)
        if cache is None:
            return self._chunked(x)
        return self._step(x, cache)

    def _chunked(self, x: Tensor) -> Tensor:
        q, f, k, v = self._inputs(x)
        B, H, T, d = q.shape
        L = self.cfg.block
        pad = (-T) % L
        N = (T + pad) // L

        def chunks(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, pad)).view(B, H, N, L, d)

        fc, kc, vc = chunks(f), chunks(k), chunks(v)
        hk, hv = torch.zeros_like(kc[:, :, :, 0]), torch.zeros_like(vc[:, :, :, 0])
        ks, vs = [], []
        for i in range(L):  # the recurrence, all chunks at once
            hk = fc[:, :, :, i] * hk + (1 - fc[:, :, :, i]) * kc[:, :, :, i]
            hv = fc[:, :, :, i] * hv + (1 - fc[:, :, :, i]) * vc[:, :, :, i]
            ks.append(hk)
            vs.append(hv)
        kt = torch.stack(ks, 3).reshape(B, H, N * L, d)[:, :, :T]  # k~_t
        vt = torch.stack(vs, 3).reshape(B, H, N * L, d)[:, :, :T]
        scale = 1.0 / math.sqrt(d)
        own = (q * kt).sum(-1, keepdim=True) * scale  # (B, H, T, 1)
        summ_k, summ_v = hk, hv  # (B, H, N, d): chunk ends (the padded last chunk's end is never used)
        cross = (q @ summ_k.transpose(-1, -2)) * scale  # (B, H, T, N)
        chunk_of = torch.arange(T, device=x.device) // L
        earlier = torch.arange(N, device=x.device)[None, :] < chunk_of[:, None]  # (T, N)
        cross = cross.masked_fill(~earlier, float("-inf"))
        w = torch.softmax(torch.cat([cross, own], dim=-1), dim=-1)
        o = w[..., :N] @ summ_v + w[..., N:] * vt
        return self.out(o)

    def _step(self, x: Tensor, cache: LayerCache) -> Tensor:
        """Tokens one at a time after ``cache.length`` (decoding; any number of tokens)."""
        q, f, k, v = self._inputs(x)
        B, H, T, d = q.shape
        L = self.cfg.block
        ex = cache.state
        if "hk" not in ex:
            ex["hk"], ex["hv"] = q.new_zeros(B, H, d), q.new_zeros(B, H, d)
            ex["sum_k"], ex["sum_v"] = q.new_zeros(B, H, 0, d), q.new_zeros(B, H, 0, d)
        outs = []
        for t in range(T):
            pos = cache.length
            if pos % L == 0:  # a new chunk: the recurrence restarts
                ex["hk"], ex["hv"] = torch.zeros_like(ex["hk"]), torch.zeros_like(ex["hv"])
            ft = f[:, :, t]
            ex["hk"] = ft * ex["hk"] + (1 - ft) * k[:, :, t]
            ex["hv"] = ft * ex["hv"] + (1 - ft) * v[:, :, t]
            keys = torch.cat([ex["sum_k"], ex["hk"][:, :, None]], dim=2)
            vals = torch.cat([ex["sum_v"], ex["hv"][:, :, None]], dim=2)
            w = torch.softmax((keys @ q[:, :, t, :, None])[..., 0] / math.sqrt(d), dim=-1)  # (B, H, n)
            outs.append((w[..., None, :] @ vals)[:, :, 0])
            cache.length += 1
            if cache.length % L == 0:  # the chunk is finished: keep its summary
                ex["sum_k"] = torch.cat([ex["sum_k"], ex["hk"][:, :, None]], dim=2)
                ex["sum_v"] = torch.cat([ex["sum_v"], ex["hv"][:, :, None]], dim=2)
        return self.out(torch.stack(outs, dim=2))

    def reference(self, x: Tensor) -> Tensor:
        """Recurrence token by token into (T, d) keys/values, then a dense masked softmax over positions: query t
        sees position j iff j == t, or j ends a chunk before t's chunk."""
        q, f, k, v = self._inputs(x)
        B, H, T, d = q.shape
        L = self.cfg.block
        hk, hv, kt, vt = 0.0, 0.0, [], []
        for t in range(T):
            if t % L == 0:
                hk, hv = torch.zeros_like(k[:, :, 0]), torch.zeros_like(v[:, :, 0])
            hk = f[:, :, t] * hk + (1 - f[:, :, t]) * k[:, :, t]
            hv = f[:, :, t] * hv + (1 - f[:, :, t]) * v[:, :, t]
            kt.append(hk)
            vt.append(hv)
        kt, vt = torch.stack(kt, 2), torch.stack(vt, 2)
        i = torch.arange(T, device=x.device)
        allowed = (i[:, None] == i[None, :]) | (((i[None, :] + 1) % L == 0) & (i[None, :] // L < i[:, None] // L))
        s = (q @ kt.transpose(-1, -2)) / math.sqrt(d)
        return self.out(torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ vt)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.dim * (seq_len // self.cfg.block + 1)
