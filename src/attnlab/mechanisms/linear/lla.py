"""Local Linear Attention (R282): attention as local linear regression at the query (test-time regression view).

Softmax attention is the Nadaraya-Watson estimator (a locally *constant* fit of values on keys with kernel weights
``p_ij = softmax_j(q_i . k_j / sqrt d)``); linear attention is a global linear fit. LLA fits a *local linear*
model around each query with the same weights and returns its value at the query:

    minimize_{a, B}  sum_{j<=i} p_ij |v_j - a - B^T (k_j - q_i)|^2 + ridge |B|^2,     o_i = a

In closed form, with weighted means ``mu_i = sum p k``, ``vbar_i = sum p v``, covariance
``Sigma_i = sum p (k - mu)(k - mu)^T`` and cross-covariance ``C_i = sum p (k - mu)(v - vbar)^T``:

    o_i = vbar_i + C_i^T (Sigma_i + ridge I)^{-1} (q_i - mu_i)

(``ridge -> inf`` gives softmax attention back). Cost ``O(T^2 d^2 + T d^3)`` and a growing key/value cache: LLA
is in this family as the "interpolation" end, not for constant memory. FlashLLA's blockwise kernel is not
reproduced; the chunked form processes ``chunk`` queries at a time.

The core is the op ``lla`` (causal, a function of q, k, v and ``ridge`` alone; the caller keeps the key/value
cache): the layer is projections + that op. A free mask restricts the keys of each query's regression; a query
that sees no key gets 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...core.checks import positive_int
from ...core.softmax import masked_softmax
from ...ops.registry import register_op
from ..layers._scored import check_free_mask, dense_allowed, repeat_kv, visible
from ..registry import register
from ._common import LinearHeadsConfig, LinearLayer, causal_mask


def _lla_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                   ridge: float = 1.0, chunk: int | None = 64) -> Tensor:
    """Float64 weighted least squares query by query: design ``[1, k_j - q_i]``, weights ``p_ij`` (softmax over the
    allowed keys), ridge on the slope only; the intercept is the output (0 for a query that sees no key)."""
    B, H, Tq, d = q.shape
    Tk = k.shape[2]
    qd, kd, vd = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    ok = dense_allowed(Tq, Tk, q_offset, True, mask, q.device).expand(B, H, Tq, Tk)
    s = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    p = torch.softmax(s.masked_fill(~ok, -torch.inf).masked_fill(~ok.any(-1, keepdim=True), 0.0), dim=-1)
    pen = torch.diag(torch.cat([qd.new_zeros(1), qd.new_full((d,), ridge)]))
    out = qd.new_zeros(B, H, Tq, v.shape[-1])
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                j = ok[b, h, i].nonzero()[:, 0]
                if len(j) == 0:
                    continue
                X = torch.cat([qd.new_ones(len(j), 1), kd[b, h, j] - qd[b, h, i]], dim=-1)  # (n, 1 + d)
                W = p[b, h, i, j, None]
                beta = torch.linalg.solve(X.T @ (W * X) + pen, X.T @ (W * vd[b, h, j]))
                out[b, h, i] = beta[0]
    return out


@register_op("lla", family="dense", papers=("R282",), summary="Local Linear Attention: local linear (ridge) "
             "regression of values on keys around each query, with softmax kernel weights",
             options={"ridge": 1.0, "chunk": 64}, causal_only=True, reference=_lla_reference,
             example={"chunk": 7})
def lla_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
           state: dict | None = None, ridge: float = 1.0, chunk: int | None = 64) -> Tensor | tuple[Tensor, dict]:
    """Causal LLA in closed form, ``chunk`` queries at a time (None: all at once): q (B, H, Tq, d) at positions
    q_offset.. over k, v (B, Hkv, Tk, d) -> (B, H, Tq, Dv); ``O(chunk Tk d^2)`` numbers live at once. Stateless."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ValueError(f"op 'lla': ridge must be > 0, got {ridge!r}")
    check_free_mask("lla", mask, q, k)
    Tq, Tk, d = q.shape[2], k.shape[2], q.shape[-1]
    step = Tq if chunk is None else positive_int("chunk", chunk)
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])  # the moments are per query head
    eye = torch.eye(d, dtype=q.dtype, device=q.device)
    outs = []
    for a in range(0, Tq, step):
        b = min(Tq, a + step)
        qa = q[:, :, a:b]
        m = visible(b - a, Tk, q_offset + a, True, q.device)
        m = m if mask is None else m & mask[:, :, a:b]
        p = masked_softmax((qa @ k.transpose(-1, -2)) * scale, m)
        mu, vbar = p @ k, p @ v  # (B, H, rows, d)
        sigma = torch.einsum("bhtn,bhnd,bhne->bhtde", p, k, k) - mu[..., :, None] * mu[..., None, :]
        cross = torch.einsum("bhtn,bhnd,bhne->bhtde", p, k, v) - mu[..., :, None] * vbar[..., None, :]
        slope = torch.linalg.solve(sigma + ridge * eye, (qa - mu)[..., None])  # (B, H, rows, d, 1)
        outs.append(vbar + (cross.transpose(-1, -2) @ slope)[..., 0])
    out = torch.cat(outs, dim=2)
    return out if state is None else (out, state)


@dataclass(frozen=True)
class LLAConfig(LinearHeadsConfig):
    """ridge: the slope's L2 penalty (> 0); mode: parallel (all queries) | chunked (chunk queries at a time) |
    recurrent (one query at a time)."""

    ridge: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


@register(
    "lla",
    family="linear",
    papers=("R282",),
    year=2025,
    summary="Local Linear Attention: local linear (ridge) regression of values on keys around each query",
    config=LLAConfig,
)
class LocalLinearAttention(LinearLayer):
    """(B, T, dim) -> (B, T, dim): projections + the op ``lla``; decoding keeps all keys and values: ``2 H d T``
    numbers."""

    op = "lla"
    kv_cache = True

    def __init__(self, cfg: LLAConfig) -> None:
        super().__init__(cfg)

    def op_options(self) -> dict:
        return {"ridge": self.cfg.ridge, "chunk": {"parallel": None, "chunked": self.cfg.chunk, "recurrent": 1}[
            self.cfg.mode]}

    def reference(self, x: Tensor) -> Tensor:
        """Weighted least squares query by query: design [1, k_j - q_i], weights p_ij, ridge on the slope only."""
        q, k, v = self.qkv(x)
        B, H, T, d = q.shape
        p = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).masked_fill(~causal_mask(T, x.device), float("-inf"))
        p = p.softmax(-1)
        pen = torch.diag(torch.cat([x.new_zeros(1), x.new_full((d,), self.cfg.ridge)]))
        out = torch.empty_like(v)
        for i in range(T):
            X = torch.cat([torch.ones_like(k[:, :, : i + 1, :1]), k[:, :, : i + 1] - q[:, :, i : i + 1]], dim=-1)
            W = p[:, :, i, : i + 1, None]  # (B, H, i+1, 1)
            beta = torch.linalg.solve(X.transpose(-1, -2) @ (W * X) + pen, X.transpose(-1, -2) @ (W * v[:, :, : i + 1]))
            out[:, :, i] = beta[:, :, 0]
        return self.out(out)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.heads * self.d * seq_len
