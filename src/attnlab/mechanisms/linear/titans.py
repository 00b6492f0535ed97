"""Titans' neural long-term memory (R29) with a linear memory (memory depth 1), causal.

The memory ``M`` (``d x d`` per head) is trained at test time on the associative loss
``l(M; x_t) = |M k_t - v_t|^2`` by gradient descent with momentum ("surprise") and weight decay ("forgetting"):

    S_t = eta_t S_{t-1} - theta_t grad l(M'; x_t),     grad = 2 (M' k_t - v_t) k_t^T
    M_t = (1 - alpha_t) M_{t-1} + S_t,                 y_t = M_t q_t

with data-dependent gates ``alpha_t, eta_t, theta_t = sigmoid(x_t W)`` per head and L2-normalized queries and keys.
As in the paper's parallel training, the gradient is taken at ``M' =`` the memory at the start of the token's chunk
of ``mem_chunk`` tokens (mini-batch gradient descent; ``mem_chunk = 1`` is plain online SGD) -- a modelling
choice, not an approximation: decoding follows the same rule. Inside a chunk the recurrences are linear, so the
chunked form computes a chunk at once (``y_t = A_t M q_t + B_t S q_t - 2 sum_j W_tj theta_j (k_j.q_t) u_j`` with
``u_j = M' k_j - v_j`` and decay matrices built from within-chunk log-cumsums); chunks follow one another.

Not included: deeper (MLP) memories, persistent memory tokens, and the MAC / MAG / MAL combinations with
attention (a hybrid stack of ``titans`` and ``mha`` layers is the MAL layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core.checks import positive_int
from ..base import check_hidden
from ..registry import register
from ._common import QKVLayer, RecurrentCache, check_common


@dataclass(frozen=True)
class TitansConfig:
    """mem_chunk: tokens per gradient step of the memory (the paper's mini-batch); mode: chunked and parallel run
    a chunk at once, recurrent a token at a time (identical results)."""

    dim: int = 256
    heads: int = 4
    mem_chunk: int = 16
    mode: str = "chunked"

    def __post_init__(self) -> None:
        check_common(self.dim, self.heads, self.mode)
        positive_int("mem_chunk", self.mem_chunk)


@register(
    "titans",
    family="linear",
    papers=("R29",),
    year=2025,
    summary="Titans neural memory (linear): test-time GD with momentum and forgetting on |Mk - v|^2, per chunk",
    config=TitansConfig,
)
class TitansMemory(QKVLayer):
    """(B, T, dim) -> (B, T, dim); decoding state ``3 H d^2`` numbers (memory, momentum, chunk-start memory)."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg.dim, cfg.heads)
        self.cfg = cfg
        self.gates = nn.Linear(cfg.dim, 3 * cfg.heads)  # alpha, eta, theta logits per head

    def _gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log(1 - alpha), log eta, theta: (B, H, T) each."""
        g = self.gates(x).view(x.shape[0], x.shape[1], 3, self.heads).permute(2, 0, 3, 1)  # (3, B, H, T)
        return F.logsigmoid(-g[0]), F.logsigmoid(g[1]), torch.sigmoid(g[2])

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x)
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

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

    def _run(self, x: Tensor, state: tuple[Tensor, Tensor, Tensor] | None, start: int) -> tuple[Tensor, tuple]:
        q, k, v = self._qkv(x)
        la, le, th = self._gates(x)
        B, H, T, d = q.shape
        if state is None:
            z = q.new_zeros(B, H, d, d)
            state = (z, z, z)
        Mp, M, S = state
        b = self.cfg.mem_chunk
        step = 1 if self.cfg.mode == "recurrent" else b
        outs, i = [], 0
        while i < T:
            pos = start + i
            n = min(T - i, step, b - pos % b)  # never cross an absolute chunk boundary
            sl = slice(i, i + n)
            y, M, S = self._segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], la[..., sl], le[..., sl], th[..., sl], Mp, M, S)
            outs.append(y)
            i += n
            if (start + i) % b == 0:
                Mp = M  # a chunk is finished: the next gradients are taken at this memory
        return torch.cat(outs, dim=2), (Mp, M, S)

    def forward(self, x: Tensor, cache: RecurrentCache | None = None) -> Tensor:
        check_hidden(x, self.cfg.dim)
        start = 0 if cache is None else cache.length
        y, state = self._run(x, None if cache is None else cache.state, start)
        if cache is not None:
            cache.state, cache.length = state, start + x.shape[1]
        return self.out(y)

    def reference(self, x: Tensor) -> Tensor:
        """The update rule token by token, as written in the paper."""
        q, k, v = self._qkv(x)
        la, le, th = self._gates(x)
        B, H, T, d = q.shape
        M = S = Mp = q.new_zeros(B, H, d, d)
        ys = []
        for t in range(T):
            if t % self.cfg.mem_chunk == 0:
                Mp = M
            kt, vt, qt = k[:, :, t, :, None], v[:, :, t, :, None], q[:, :, t, :, None]
            grad = 2.0 * (Mp @ kt - vt) @ kt.transpose(-1, -2)
            S = le[:, :, t, None, None].exp() * S - th[:, :, t, None, None] * grad
            M = la[:, :, t, None, None].exp() * M + S
            ys.append((M @ qt)[..., 0])
        return self.out(torch.stack(ys, dim=2))

    def state_size(self, seq_len: int) -> int:
        return 3 * self.heads * self.d * self.d
