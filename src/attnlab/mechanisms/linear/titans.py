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

Not included: persistent memory tokens, and the MAC / MAG / MAL combinations with attention (a hybrid stack of
``titans`` and ``mha`` layers is the MAL layout).

Not an op (``op = None``): the core is not a function of q, k, v. The memory is trained at test time with gates
``alpha, eta, theta`` computed from the hidden state ``x`` (a projection, not a small per-head parameter), and a
deep memory's initial weights are learned parameters of the outer loop; there are no attention weights over keys
to compute from q and k, so the layer keeps its own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ..heads import LayerCache
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
