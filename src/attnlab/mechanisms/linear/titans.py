"""Titans' neural long-term memory (R29), causal: a linear memory (depth 1) or a deep MLP memory (depth >= 2).

The memory ``M`` (per head) is trained at test time on the associative loss ``l(M; x_t) = |M(k_t) - v_t|^2`` by
gradient descent with momentum ("surprise") and weight decay ("forgetting"):

    S_t = eta_t S_{t-1} - theta_t grad l(M'; x_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t,                 y_t = M_t(q_t)

with data-dependent gates ``alpha_t, eta_t, theta_t = sigmoid(x_t W)`` per head and L2-normalized queries and keys.
As in the paper's parallel training, the gradient is taken at ``M' =`` the memory at the start of the token's chunk
of ``block`` tokens (mini-batch gradient descent; ``block = 1`` is plain online SGD) -- a modelling
choice, not an approximation: decoding follows the same rule. The recurrences are linear in ``M, S`` once the
gradients are fixed, so inside a chunk everything is parallel and chunks follow one another.

**Depth 1** (``memory_depth=1``, the default): ``M`` is a ``d x d`` matrix starting at zero, ``grad = 2 (M' k_t -
v_t) k_t^T``, and the chunked form computes a chunk at once (``y_t = A_t M q_t + B_t S q_t - 2 sum_j W_tj
theta_j (k_j.q_t) u_j`` with ``u_j = M' k_j - v_j`` and decay matrices built from within-chunk log-cumsums).

**Deep memory** (``memory_depth = L >= 2``): ``M`` is an MLP ``d -> h -> ... -> h -> d`` (``h = memory_hidden``,
default ``d``) with SiLU between layers and no biases; its initial weights ``M_0`` are learned parameters (the
paper's outer loop; a zero MLP would have zero gradients and never learn), and the step ``theta`` starts near
``sigmoid(-4) = 0.018`` (its gate bias; the paper leaves the initialization open, and steps near 0.5 make an MLP
memory diverge). Every layer ``l`` is linear in its own
weight ``W^l``, so a token's gradient is an outer product ``delta^l_j a^l_j^T`` (``a^l_j``: the layer's input for
key ``k_j`` under ``M'``, ``delta^l_j``: the back-propagated error, ``delta^L = 2 (M'(k_j) - v_j)``,
``delta^l = (delta^{l+1} W'^{l+1}) * silu'(z^l)``) -- derived by hand, no autograd inside the layer. Then the
weights of token ``t``, applied to that layer's input ``h_t``, are

    W^l_t h_t = A_t (W^l h_t) + B_t (S^l h_t) - sum_{j<=t} W_tj (a^l_j . h_t) delta^l_j

(the depth-1 closed form, layer by layer), so a chunk costs ``O(n^2 d + n d h)`` per layer and per-token weights are
never materialized. ``reference`` runs the paper's equations token by token with materialized weights and
autograd gradients (``create_graph``), so outputs, memory states and parameter gradients are checked against it.

Decoding: the cache holds ``(M', M, S)`` -- the chunk-start memory, the memory and the momentum (each a tuple of
per-layer weights for deep memories). A token's update is applied at once with the gradient at ``M'`` and its
output read from ``M_t``; ``M'`` moves to ``M`` when a token completes an absolute chunk of ``block``. This is
exactly the full forward's rule, so decoding token by token (or in any split) equals the full forward.

The combinations with attention are layers of their own below: ``titans_mag`` (memory as a gate: sliding-window
attention with persistent memory tokens, gated by the memory) and ``titans_mac`` (memory as context: segment
attention over persistent tokens, the memory's retrievals and the segment; the memory learns from and gates the
attention output). MAL is a hybrid stack of ``titans`` and ``mha`` layers.

Not an op (``op = None``): the core is not a function of q, k, v. The memory is trained at test time with gates
``alpha, eta, theta`` computed from the hidden state ``x`` (a projection, not a small per-head parameter), and a
deep memory's initial weights are learned parameters of the outer loop; there are no attention weights over keys
to compute from q and k, so the layer keeps its own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.attention import attention
from ...core.checks import positive_int
from ...core.patterns import Sinks, SlidingWindow
from ..common import RMSNorm, split_heads
from ..heads import HeadsConfig, LayerCache, OpLayer
from ..registry import register
from ._common import LINEAR_FIXED, LinearHeadsConfig, LinearLayer

Weights = tuple[Tensor, ...]  # per-layer memory weights, each (B, H, d_out, d_in)


@dataclass(frozen=True)
class TitansConfig(LinearHeadsConfig):
    """block: tokens per gradient step of the memory (the paper's mini-batch); mode: chunked and parallel run
    a block at once, recurrent a token at a time (identical results); memory_depth: layers of the memory MLP
    (1: the linear memory); memory_hidden: width of its hidden layers (None: the head dim)."""

    block: int = 16
    memory_depth: int = 1
    memory_hidden: int | None = None

    fixed = (*LINEAR_FIXED, "chunk")
    renamed = {"mem_chunk": "block", "chunk_size": "chunk"}

    def validate(self) -> None:
        super().validate()
        positive_int("block", self.block)
        positive_int("memory_depth", self.memory_depth)
        if self.memory_hidden is not None:
            positive_int("memory_hidden", self.memory_hidden)
            if self.memory_depth == 1:
                raise ValueError("memory_hidden needs memory_depth >= 2 (a depth-1 memory has no hidden layer)")


def _dsilu(z: Tensor) -> Tensor:
    """silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@register(
    "titans",
    family="linear",
    papers=("R29",),
    year=2025,
    summary="Titans neural memory (linear or deep MLP): test-time GD with momentum and forgetting on |M(k) - v|^2, "
    "gradients at the chunk start",
    config=TitansConfig,
)
class TitansMemory(LinearLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``3 H P`` numbers (memory, momentum, chunk-start memory), with
    ``P`` the memory's weights per head (``d^2`` at depth 1)."""

    op = None  # test-time training of the memory is the layer's own code
    kv_cache = False

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg)
        self.gates = nn.Linear(cfg.dim, 3 * cfg.heads)  # alpha, eta, theta logits per head
        d, L = self.d, cfg.memory_depth
        h = cfg.memory_hidden or d
        self.mem_shapes = [(d if i == L - 1 else h, d if i == 0 else h) for i in range(L)]  # (d_out, d_in)
        if L > 1:
            # the initial memory M_0, learned by the outer loop (per head)
            self.mem_init = nn.ParameterList(
                nn.Parameter(torch.randn(cfg.heads, o, i) / math.sqrt(i)) for o, i in self.mem_shapes
            )
            with torch.no_grad():  # an MLP diverges under steps near 0.5: start theta near sigmoid(-4) = 0.018
                self.gates.bias[2 * cfg.heads :].fill_(-4.0)

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log(1 - alpha), log eta, theta: (B, H, T) each."""
        g = self.gates(x).view(x.shape[0], x.shape[1], 3, self.heads).permute(2, 0, 3, 1)  # (3, B, H, T)
        return F.logsigmoid(-g[0]), F.logsigmoid(g[1]), torch.sigmoid(g[2])

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    # ---- depth 1: closed form with M @ k ------------------------------------------------------------------------

    def _segment(self, q, k, v, la, le, th, Mp: Tensor, M: Tensor, S: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A run of tokens inside one chunk. q, k, v (B, H, n, d); la, le, th (B, H, n); memories (B, H, d, d)
        act as ``M @ k``. Returns y (B, H, n, d) and the memory and momentum after the run."""
        n = q.shape[2]
        La, Le = la.cumsum(-1), le.cumsum(-1)  # within-segment log products, <= 0
        low = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        DA = (La[..., :, None] - La[..., None, :]).masked_fill(~low, float("-inf")).exp()  # prod_{i<r<=t}(1-alpha_r)
        DE = (Le[..., :, None] - Le[..., None, :]).masked_fill(~low, float("-inf")).exp()  # prod_{j<r<=i} eta_r
        A = La.exp()  # (B, H, n): decay of M
        Bm = DA @ Le.exp()[..., None]  # (B, H, n, 1): weight of S in M_t
        W = (DA @ DE) * th[..., None, :]  # (B, H, n, n): weight of grad_j in M_t
        u = k @ Mp.transpose(-1, -2) - v  # (B, H, n, d): M' k_j - v_j
        y = A[..., None] * (q @ M.transpose(-1, -2)) + Bm * (q @ S.transpose(-1, -2))
        y = y - 2.0 * ((W * (q @ k.transpose(-1, -2))) @ u)
        # the state after the run: the last row of the same sums, as outer products
        w_last = W[..., -1, :]  # (B, H, n)
        e_last = DE[..., -1, :] * th
        M_new = A[..., -1, None, None] * M + Bm[..., -1, :, None] * S - 2.0 * (u * w_last[..., None]).transpose(-1, -2) @ k
        S_new = Le[..., -1, None, None].exp() * S - 2.0 * (u * e_last[..., None]).transpose(-1, -2) @ k
        return y, M_new, S_new

    # ---- deep memory: the same closed form, layer by layer ------------------------------------------------------

    def _grad_factors(self, Mp: Weights, k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-token gradients of |M'(k_j) - v_j|^2 as outer-product factors: inputs ``a^l`` (B, H, n, d_in) and
        errors ``delta^l`` (B, H, n, d_out) per layer, ``grad W^l_j = delta^l_j a^l_j^T`` (back-propagation by hand)."""
        L = len(Mp)
        acts, pre = [k], []
        h = k
        for i, Wl in enumerate(Mp):
            z = h @ Wl.transpose(-1, -2)
            pre.append(z)
            if i < L - 1:
                h = F.silu(z)
                acts.append(h)
        deltas: list[Tensor] = [None] * L  # type: ignore[list-item]
        delta = 2.0 * (z - v)
        deltas[L - 1] = delta
        for i in range(L - 2, -1, -1):
            delta = (delta @ Mp[i + 1]) * _dsilu(pre[i])
            deltas[i] = delta
        return acts, deltas

    def _deep_segment(
        self, q, k, v, la, le, th, Mp: Weights, M: Weights, S: Weights
    ) -> tuple[Tensor, Weights, Weights]:
        """As ``_segment`` for an MLP memory: tuples of per-layer weights (B, H, d_out, d_in)."""
        n = q.shape[2]
        La, Le = la.cumsum(-1), le.cumsum(-1)
        low = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        DA = (La[..., :, None] - La[..., None, :]).masked_fill(~low, float("-inf")).exp()
        DE = (Le[..., :, None] - Le[..., None, :]).masked_fill(~low, float("-inf")).exp()
        A = La.exp()[..., None]  # (B, H, n, 1)
        Bm = DA @ Le.exp()[..., None]  # (B, H, n, 1)
        W = (DA @ DE) * th[..., None, :]  # (B, H, n, n): weight of token j's gradient in M_t
        acts, deltas = self._grad_factors(Mp, k, v)
        L = len(M)
        h = q
        for i in range(L):  # token t's own weights applied to its own layer input, never materialized
            z = A * (h @ M[i].transpose(-1, -2)) + Bm * (h @ S[i].transpose(-1, -2))
            z = z - (W * (h @ acts[i].transpose(-1, -2))) @ deltas[i]
            h = F.silu(z) if i < L - 1 else z
        w_last = W[..., -1, :, None]  # (B, H, n, 1)
        e_last = (DE[..., -1, :] * th)[..., None]
        a_n, b_n, eta_n = A[..., -1, :, None], Bm[..., -1, :, None], Le[..., -1, None, None].exp()
        M_new = tuple(a_n * M[i] + b_n * S[i] - (deltas[i] * w_last).transpose(-1, -2) @ acts[i] for i in range(L))
        S_new = tuple(eta_n * S[i] - (deltas[i] * e_last).transpose(-1, -2) @ acts[i] for i in range(L))
        return h, M_new, S_new

    def _initial_state(self, B: int, like: Tensor) -> tuple:
        """(M', M, S) before any token: zero memory at depth 1, the learned ``M_0`` (zero momentum) deeper."""
        if self.cfg.memory_depth == 1:
            z = like.new_zeros(B, self.heads, self.d, self.d)
            return z, z, z
        M0 = tuple(w.to(like.dtype)[None].expand(B, -1, -1, -1) for w in self.mem_init)
        return M0, M0, tuple(torch.zeros_like(w) for w in M0)

    def _run(self, x: Tensor, state: tuple | None, start: int) -> tuple[Tensor, tuple]:
        q, k, v = self._qkv(x)
        la, le, th = self._gates(x)
        T = q.shape[2]
        if state is None:
            state = self._initial_state(q.shape[0], q)
        Mp, M, S = state
        segment = self._segment if self.cfg.memory_depth == 1 else self._deep_segment
        b = self.cfg.block
        step = 1 if self.cfg.mode == "recurrent" else b
        outs, i = [], 0
        while i < T:
            pos = start + i
            n = min(T - i, step, b - pos % b)  # never cross an absolute chunk boundary
            sl = slice(i, i + n)
            y, M, S = segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], la[..., sl], le[..., sl], th[..., sl], Mp, M, S)
            outs.append(y)
            i += n
            if (start + i) % b == 0:
                Mp = M  # a chunk is finished: the next gradients are taken at this memory
        return torch.cat(outs, dim=2), (Mp, M, S)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        start = self.check_cache(x, cache)
        y, state = self._run(x, None if cache is None else cache.state.get("memory"), start)
        if cache is not None:
            cache.state["memory"], cache.length = state, start + x.shape[1]
        return self.out(y)

    # ---- references: the update rule token by token -------------------------------------------------------------

    def reference(self, x: Tensor) -> Tensor:
        """The update rule token by token, as written in the paper."""
        if self.cfg.memory_depth > 1:
            return self.out(self.reference_deep(x)[0])
        q, k, v = self._qkv(x)
        la, le, th = self._gates(x)
        B, H, T, d = q.shape
        M = S = Mp = q.new_zeros(B, H, d, d)
        ys = []
        for t in range(T):
            if t % self.cfg.block == 0:
                Mp = M
            kt, vt, qt = k[:, :, t, :, None], v[:, :, t, :, None], q[:, :, t, :, None]
            grad = 2.0 * (Mp @ kt - vt) @ kt.transpose(-1, -2)
            S = le[:, :, t, None, None].exp() * S - th[:, :, t, None, None] * grad
            M = la[:, :, t, None, None].exp() * M + S
            ys.append((M @ qt)[..., 0])
        return self.out(torch.stack(ys, dim=2))

    @staticmethod
    def memory_mlp(weights: Weights, x: Tensor) -> Tensor:
        """The memory as a function: x (B, H, d) through weights (B, H, d_out, d_in), SiLU between layers."""
        for i, w in enumerate(weights):
            x = torch.einsum("bhoi,bhi->bho", w, x)
            if i < len(weights) - 1:
                x = F.silu(x)
        return x

    def reference_deep(self, x: Tensor) -> tuple[Tensor, tuple]:
        """Token by token with materialized weights ``M_t`` and autograd gradients of ``|M'(k_t) - v_t|^2`` at the
        chunk-start memory ``M'`` (``create_graph``, so parameter gradients flow through the inner updates).
        Returns y (B, H, T, d) before the output projection and the final ``(M', M, S)``."""
        q, k, v = self._qkv(x)
        la, le, th = self._gates(x)
        T = q.shape[2]
        Mp, M, S = self._initial_state(q.shape[0], q)
        ys = []
        with torch.enable_grad():  # the inner loop's gradients exist even when the caller runs without grad
            for t in range(T):
                if t % self.cfg.block == 0:
                    Mp = M
                wp = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in Mp)
                loss = (self.memory_mlp(wp, k[:, :, t]) - v[:, :, t]).pow(2).sum()  # a sum of per-(B, H) losses
                grads = torch.autograd.grad(loss, wp, create_graph=True)
                eta, theta, keep = (g[:, :, t, None, None] for g in (le.exp(), th, la.exp()))
                S = tuple(eta * s - theta * g for s, g in zip(S, grads))
                M = tuple(keep * m + s for m, s in zip(M, S))
                ys.append(self.memory_mlp(M, q[:, :, t]))
                if t % self.cfg.block == self.cfg.block - 1:
                    Mp = M
        return torch.stack(ys, dim=2), (Mp, M, S)

    def state_size(self, seq_len: int) -> int:
        return 3 * self.heads * sum(o * i for o, i in self.mem_shapes)


# ---- Titans MAG: memory as a gate [R29] ---------------------------------------------------------------------


@dataclass(frozen=True)
class TitansMAGConfig(HeadsConfig):
    """Memory as a gate: sliding-window attention over ``persistent`` learned tokens + the ``window`` newest keys,
    gated by the neural memory (``block``, ``memory_depth``, ``memory_hidden`` as in ``titans``; the memory has
    ``heads`` full heads of ``dim // heads``)."""

    dim: int = 64
    heads: int = 4
    window: int = 64  # keys of the sliding window (the query's own included)
    persistent: int = 4  # learned persistent-memory tokens prefixed to the sequence (0: none)
    block: int = 16
    memory_depth: int = 1
    memory_hidden: int | None = None

    fixed: ClassVar[tuple[str, ...]] = ("causal",)

    def validate(self) -> None:
        positive_int("window", self.window)
        if isinstance(self.persistent, bool) or not isinstance(self.persistent, int) or self.persistent < 0:
            raise ValueError(f"persistent must be a non-negative integer, got {self.persistent!r}")
        self.memory_config()  # validates block, memory_depth, memory_hidden

    def memory_config(self) -> TitansConfig:
        return TitansConfig(dim=self.dim, heads=self.heads, block=self.block, memory_depth=self.memory_depth,
                            memory_hidden=self.memory_hidden)


@register(
    "titans_mag", family="layers", papers=("R29",), year=2025, config=TitansMAGConfig,
    summary="Titans MAG: sliding-window attention with persistent memory tokens, gated by the neural memory",
)
class TitansMAG(OpLayer):
    """(B, T, dim) -> (B, T, dim). ``x~ = [p_1 .. p_Np] || x``; ``y = SW-Attn*(x~)`` (every query sees the
    persistent tokens and its ``window`` newest keys); ``o = RMSNorm(y) * sigmoid(RMSNorm(M(x~)))`` with
    ``M`` the neural memory (a ``titans`` layer run over ``x~``, so the persistent tokens are its first inputs).

    Conventions: the persistent tokens are vectors of the model width, projected by the attention's k/v
    projections without RoPE (they carry no position); real tokens keep positions ``0..`` for RoPE. The gate is
    the paper's "normalize both with learnable vector-valued weights, then a non-linearity": RMSNorm with a
    learned weight on each branch (after its output projection), sigmoid on the memory side."""

    op = None  # a pattern attention plus a test-time-trained memory
    kv_cache = True

    def __init__(self, cfg: TitansMAGConfig) -> None:
        super().__init__(cfg)
        # the persistent tokens (none: no parameter, so no empty tensor among the parameters)
        self.persist = nn.Parameter(torch.randn(cfg.persistent, cfg.dim) * cfg.dim**-0.5) if cfg.persistent else None
        self.memory = TitansMemory(cfg.memory_config())
        self.norm_y = RMSNorm(cfg.dim)
        self.norm_m = RMSNorm(cfg.dim)

    def _prefix(self, x: Tensor) -> Tensor:
        """``x~ = [p_1 .. p_Np] || x``: (B, Np + T, dim)."""
        if self.persist is None:
            return x
        return torch.cat([self.persist.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype), x], 1)

    def _persistent_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the persistent tokens: (B, Hkv, Np, d) each, no RoPE."""
        p = self._prefix(x[:, :0])
        return split_heads(self.k_proj(p), self.cfg.kvh), split_heads(self.v_proj(p), self.cfg.kvh)

    def _memory(self, x: Tensor, state: tuple | None, start: int) -> tuple[Tensor, tuple]:
        """M(x~) for rows ``start..`` of ``x``: (B, T, dim); the first call also runs the persistent tokens."""
        Np = self.cfg.persistent
        if start == 0:
            x = self._prefix(x)
        y, state = self.memory._run(x, state, 0 if start == 0 else start + Np)
        y = self.memory.out(y)
        return (y[:, Np:] if start == 0 else y), state

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        start = self.check_cache(x, cache)
        q, k, v = self.project(x, start)
        if cache is not None:
            k, v = self.remember(cache, k, v, x.shape[1])
        pk, pv = self._persistent_kv(x)
        Np, w = self.cfg.persistent, self.cfg.window
        pattern = SlidingWindow(w) | Sinks(Np) if Np else SlidingWindow(w)
        o = attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), pattern=pattern, scale=self.cfg.d**-0.5,
                      q_offset=start + Np)  # positions of x~: the persistent tokens come first
        m, state = self._memory(x, None if cache is None or start == 0 else cache.state["memory"], start)
        if cache is not None:
            cache.state["memory"] = state
        return self.norm_y(self.out(o)) * torch.sigmoid(self.norm_m(m))

    def reference(self, x: Tensor) -> Tensor:
        """Plainly: dense scores over ``x~`` with the mask written per (row, key), and the memory's token-by-token
        rule over ``x~``."""
        B, T, _ = x.shape
        Np, w, H, Hkv = self.cfg.persistent, self.cfg.window, self.cfg.heads, self.cfg.kvh
        q, k, v = self.project(x, 0)
        pk, pv = self._persistent_kv(x)
        kk = torch.cat([pk, k], 2).repeat_interleave(H // Hkv, 1).double()
        vv = torch.cat([pv, v], 2).repeat_interleave(H // Hkv, 1).double()
        allowed = torch.tensor([[j < Np or 0 <= i - (j - Np) < w for j in range(Np + T)] for i in range(T)])
        s = (q.double() @ kk.transpose(-1, -2)) * self.cfg.d**-0.5
        o = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
        m = self.memory.reference(self._prefix(x))[:, Np:]
        return self.norm_y(self.out(o.to(x.dtype))) * torch.sigmoid(self.norm_m(m))

    def state_size(self, seq_len: int) -> int:
        """Keys and values of every position (the window reads the newest ``window``) plus the memory's state."""
        return 2 * self.cfg.kvh * self.cfg.d * seq_len + self.memory.state_size(seq_len)


# ---- Titans MAC: memory as context [R29] --------------------------------------------------------------------


@dataclass(frozen=True)
class TitansMACConfig(HeadsConfig):
    """Memory as context: the sequence in segments of ``segment`` tokens; each segment attends (causally) to the
    ``persistent`` learned tokens, the memory's retrievals for its tokens and its own tokens; the memory (the
    ``titans`` rule, ``memory_depth`` / ``memory_hidden``; its gradient chunk is the segment) learns from the
    attention output and gates it."""

    dim: int = 64
    heads: int = 4
    segment: int = 16  # tokens per segment (the attention's span and the memory's gradient chunk)
    persistent: int = 4  # learned persistent-memory tokens (0: none)
    memory_depth: int = 1
    memory_hidden: int | None = None

    fixed: ClassVar[tuple[str, ...]] = ("causal", "rope")

    def validate(self) -> None:
        positive_int("segment", self.segment)
        if isinstance(self.persistent, bool) or not isinstance(self.persistent, int) or self.persistent < 0:
            raise ValueError(f"persistent must be a non-negative integer, got {self.persistent!r}")
        self.memory_config()

    def memory_config(self) -> TitansConfig:
        return TitansConfig(dim=self.dim, heads=self.heads, block=self.segment, memory_depth=self.memory_depth,
                            memory_hidden=self.memory_hidden)


@register(
    "titans_mac", family="layers", papers=("R29",), year=2025, config=TitansMACConfig,
    summary="Titans MAC: segment attention over persistent tokens + memory retrievals + the segment, the memory "
    "trained on and gating the attention output",
)
class TitansMAC(OpLayer):
    """(B, T, dim) -> (B, T, dim). Per segment ``S`` (``segment`` tokens): retrievals ``h_j = M'(q_j)`` with
    ``M'`` the memory before the segment and ``q_j`` the memory's query of token ``j``; token ``i`` attends to
    ``[p_1 .. p_Np] || h_{s..i} || x_{s..i}`` (``s``: its segment's start); ``y = Attn(...)``; the memory is then
    trained on ``y`` (the ``titans`` rule, gradients at ``M'``) and read at ``y``: ``o = RMSNorm(y) *
    sigmoid(RMSNorm(M_i(y_i)))``.

    Deviations (for a causal, decodable layer): token ``i`` sees the retrievals and tokens of its segment up to
    itself (the paper's causal attention over ``p || h || S`` would let it see every retrieval of the segment),
    and the memory's read after the update is per token (``M_i``, holding ``y_{..i}``), not the segment's end
    memory. Attention does not cross segments: the past reaches a segment only through the memory. No RoPE.
    Decoding keeps the current segment's keys and values and the memory's state: ``O(segment)`` memory."""

    op = None
    kv_cache = False  # the current segment's keys and values live in the state

    def __init__(self, cfg: TitansMACConfig) -> None:
        super().__init__(cfg)
        self.persist = nn.Parameter(torch.randn(cfg.persistent, cfg.dim) * cfg.dim**-0.5) if cfg.persistent else None
        self.memory = TitansMemory(cfg.memory_config())
        self.norm_y = RMSNorm(cfg.dim)
        self.norm_m = RMSNorm(cfg.dim)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return split_heads(self.k_proj(x), self.cfg.kvh), split_heads(self.v_proj(x), self.cfg.kvh)

    def _retrieve(self, x: Tensor, Mp) -> Tensor:
        """h = M'(q): (B, n, dim), the memory before the segment read at the memory's queries of ``x``."""
        h = self.memory._qkv(x)[0]  # (B, H, n, d), normalized
        weights = (Mp,) if isinstance(Mp, Tensor) else Mp  # depth 1: one matrix per head
        for i, w in enumerate(weights):
            h = h @ w.transpose(-1, -2)
            if i < len(weights) - 1:
                h = F.silu(h)
        return self.memory.out(h)

    def _run_mac(self, x: Tensor, state: dict, start: int) -> Tensor:
        B, T, _ = x.shape
        C, H = self.cfg.segment, self.cfg.heads
        p = x.new_zeros(B, 0, self.cfg.dim) if self.persist is None else self.persist.expand(B, -1, -1).to(x.dtype)
        pk, pv = self._kv(p)
        outs, i = [], 0
        while i < T:
            pos = start + i
            n = min(T - i, C - pos % C)  # never cross a segment boundary
            xs = x[:, i : i + n]
            if pos % C == 0:  # a new segment: its keys start empty
                state["seg"] = tuple(x.new_zeros(B, self.cfg.kvh, 0, self.cfg.d) for _ in range(4))
            mem = state.get("memory") or self.memory._initial_state(B, x)
            hk, hv = self._kv(self._retrieve(xs, mem[0]))
            xk, xv = self._kv(xs)
            seg = tuple(torch.cat([a, b], 2) for a, b in zip(state["seg"], (hk, hv, xk, xv)))
            state["seg"] = seg
            L = seg[0].shape[2]  # segment tokens so far, this piece included
            own = torch.arange(L, device=x.device).view(1, L) <= (torch.arange(n, device=x.device) + L - n).view(n, 1)
            mask = torch.cat([own.new_ones(n, pk.shape[2]), own, own], 1)
            q = split_heads(self.q_proj(xs), H)
            o = F.scaled_dot_product_attention(q, torch.cat([pk, seg[0], seg[2]], 2), torch.cat([pv, seg[1], seg[3]], 2),
                                               attn_mask=mask, scale=self.cfg.d**-0.5, enable_gqa=True)
            y = self.out(o)
            ym, state["memory"] = self.memory._run(y, mem, pos)
            outs.append(self.norm_y(y) * torch.sigmoid(self.norm_m(self.memory.out(ym))))
            i += n
        return torch.cat(outs, 1)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        start = self.check_cache(x, cache)
        out = self._run_mac(x, {} if cache is None else cache.state, start)
        if cache is not None:
            cache.length = start + x.shape[1]
        return out

    def reference(self, x: Tensor) -> Tensor:
        """Token by token: the memory's weights materialized and updated with autograd gradients at the
        segment-start memory; each row's attention written densely over the keys it may see."""
        B, T, _ = x.shape
        C, H, Hkv, d = self.cfg.segment, self.cfg.heads, self.cfg.kvh, self.cfg.d
        mem = self.memory
        pk, pv = self._kv(x[:, :0] if self.persist is None else self.persist.expand(B, -1, -1).to(x.dtype))
        Mp, M, S = mem._initial_state(B, x)
        if isinstance(M, Tensor):
            Mp, M, S = (Mp,), (M,), (S,)
        keys: list[Tensor] = []
        vals: list[Tensor] = []
        outs = []
        with torch.enable_grad():
            for t in range(T):
                xt = x[:, t : t + 1]
                if t % C == 0:
                    Mp, keys, vals = M, [], []
                h = mem.out(mem.memory_mlp(Mp, mem._qkv(xt)[0][:, :, 0]).unsqueeze(2))  # (B, 1, dim)
                keys, vals = keys + [self._kv(h)[0], self._kv(xt)[0]], vals + [self._kv(h)[1], self._kv(xt)[1]]
                kk = torch.cat([pk, *keys], 2).repeat_interleave(H // Hkv, 1).double()
                vv = torch.cat([pv, *vals], 2).repeat_interleave(H // Hkv, 1).double()
                q = split_heads(self.q_proj(xt), H).double()
                a = torch.softmax((q @ kk.transpose(-1, -2)) * d**-0.5, -1) @ vv
                y = self.out(a.to(x.dtype))  # (B, 1, dim)
                qm, km, vm = (z[:, :, 0] for z in mem._qkv(y))
                la, le, th = (g[:, :, 0, None, None] for g in mem._gates(y))
                # a copy of M': the inner gradient is through the memory's weights only (y also depends on M'
                # through the retrievals); create_graph keeps the outer gradients through the copy
                wp = tuple(w.clone() if w.requires_grad else w.detach().requires_grad_() for w in Mp)
                g = torch.autograd.grad((mem.memory_mlp(wp, km) - vm).pow(2).sum(), wp, create_graph=True)
                S = tuple(le.exp() * s - th * gi for s, gi in zip(S, g))
                M = tuple(la.exp() * m + s for m, s in zip(M, S))
                m_out = mem.out(mem.memory_mlp(M, qm).unsqueeze(2))
                outs.append(self.norm_y(y) * torch.sigmoid(self.norm_m(m_out)))
        return torch.cat(outs, 1)

    def state_size(self, seq_len: int) -> int:
        """The memory's state plus the current segment's keys and values (retrievals and tokens): the last
        ``(seq_len - 1) % segment + 1`` positions (a full segment is kept until the next token starts one)."""
        held = (seq_len - 1) % self.cfg.segment + 1 if seq_len else 0
        return self.memory.state_size(seq_len) + 4 * self.cfg.kvh * self.cfg.d * held
