"""Linear-attention kernels: one decayed recurrence in three equivalent forms (papers R18, R16).

The recurrence, per batch and head, with features ``q_t, k_t`` (length F) and values ``v_t`` (length Dv)::

    S_t = a_t * S_{t-1} + k_t^T v_t          (F x Dv state, a_t = exp(g_t) in (0, 1], scalar per head)
    o_t = q_t S_t

* ``mode="parallel"``  -- ``O = (Q K^T * D) V`` with ``D[t, s] = exp(G_t - G_s)`` for ``s <= t``: quadratic, the
  plain form the others are tested against.
* ``mode="chunked"``   -- Lightning Attention: exact masked attention inside a chunk of ``C`` tokens ("intra"),
  a carried state between chunks ("inter"). Cost ``O(T C F + T F Dv)``; only within-chunk relative log decays
  are exponentiated, and every exponent is ``<= 0``, so nothing overflows at any length.
* ``mode="recurrent"`` -- one token at a time, constant memory: decoding.

``normalize=True`` divides by ``q_t z_t`` with ``z_t = a_t z_{t-1} + k_t`` (classic linear attention); it is
computed by the same kernel on values augmented with a column of ones, so the state is ``F x (Dv + 1)``.

Low-precision inputs (bf16, fp16) are computed in float32 and the state is carried in float32.

Also here, sharing the same chunking idea:

* :func:`cumulative_softmax_attention` -- ``o_t = sum_m q_tm * softmax_{j<=t}(s_jm) v_j``: a per-feature softmax
  over the prefix, the additive recurrence of LightNet (R40) and the agent-to-key step of Agent attention (R55),
  stabilized by a running per-feature maximum.
* :func:`ema` -- Mega's multi-dimensional damped exponential moving average (L190), as a causal convolution
  (FFT) or a recurrence, with a carried state.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

MODES = ("parallel", "chunked", "recurrent")
DEFAULT_CHUNK = {"cpu": 64, "cuda": 64}
SEGMENT_CHUNKS = 32  # chunks per segment: keeps the working set in cache, so time per token stays flat (measured)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_decay(log_decay: Tensor | float | None, B: int, H: int, T: int, like: Tensor) -> Tensor | None:
    """Broadcastable per-head log decay: ``None``, ``(1, H, 1)`` (constant per head) or ``(B|1, H, T)``."""
    if log_decay is None:
        return None
    g = torch.as_tensor(log_decay, device=like.device)
    g = g.to(_work_dtype(like.dtype))
    if g.dim() == 0:
        g = g.expand(H)
    if g.dim() == 1:
        if g.shape[0] != H:
            raise ValueError(f"log_decay of shape {tuple(g.shape)} does not match heads={H}")
        return g.view(1, H, 1)
    if g.dim() == 3 and g.shape[1] == H and g.shape[2] == T and g.shape[0] in (1, B):
        return g
    raise ValueError(f"log_decay must be a scalar, (H,) or (B, H, T) = ({B}, {H}, {T}), got {tuple(g.shape)}")


def _check(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"expected q, k (B, H, T, F) of equal shape and v (B, H, T, Dv); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, F = q.shape
    return B, H, T, F, v.shape[-1]


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | float | None = None,
    *,
    state: Tensor | None = None,
    normalize: bool = False,
    eps: float = 1e-6,
    mode: str = "chunked",
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Decayed causal linear attention.

    Args:
        q, k: feature-mapped queries and keys ``(B, H, T, F)``.
        v: values ``(B, H, T, Dv)``.
        log_decay: ``g_t = log a_t <= 0``: None (no decay), a scalar, ``(H,)`` per head, or ``(B, H, T)``
            per token (data-dependent gates).
        state: the carried state ``(B, H, F, Dv)`` (``Dv + 1`` columns when ``normalize``) from a previous call.
        normalize: divide by ``q_t z_t + eps``.
        mode: ``"parallel"``, ``"chunked"`` or ``"recurrent"`` (identical results).
        chunk: tokens per chunk for ``"chunked"`` (default: the measured per-device choice).
    Returns: ``o (B, H, T, Dv)`` in q's dtype and the final state (float32 or float64).
    """
    B, H, T, F, Dv = _check(q, k, v)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dtype = q.dtype
    wd = _work_dtype(q.dtype)
    q, k, v = q.to(wd), k.to(wd), v.to(wd)
    g = _log_decay(log_decay, B, H, T, q)
    if g is not None and bool((g > 0).any()):
        raise ValueError("log_decay must be <= 0 (a decay, not a growth)")
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    cols = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, F, cols)
    elif state.shape[-2:] != (F, cols) or state.shape[:2] not in ((B, H), (1, H)):
        raise ValueError(f"state must have shape ({B}, {H}, {F}, {cols}), got {tuple(state.shape)}")
    state = state.to(wd)
    if mode == "parallel":
        o, state = _parallel(q, k, v, g, state)
    elif mode == "recurrent":
        o, state = _recurrent(q, k, v, g, state)
    else:
        C = chunk or DEFAULT_CHUNK.get(q.device.type, 64)
        o, state = _chunked(q, k, v, g, state, C)
    if normalize:
        o = o[..., :Dv] / (o[..., Dv:] + eps)
    return o.to(out_dtype), state


def _parallel(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, S0: Tensor) -> tuple[Tensor, Tensor]:
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2)  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if g is None:
        w = scores.masked_fill(~causal, 0.0)
        return w @ v + q @ S0, S0 + k.transpose(-1, -2) @ v
    G = g.expand(-1, -1, T).cumsum(-1)  # (B|1, H, T): log of the decay from the start to t
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    o = (scores * D) @ v + (q * G[..., None].exp()) @ S0
    to_end = (G[..., -1:] - G).exp()[..., None]  # decay from s to the end
    S = G[..., -1, None, None].exp() * S0 + (k * to_end).transpose(-1, -2) @ v
    return o, S


def _recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, S: Tensor) -> tuple[Tensor, Tensor]:
    outs = []
    for t in range(q.shape[2]):
        if g is not None:
            gt = g[..., t] if g.shape[-1] > 1 else g[..., 0]
            S = gt.exp()[..., None, None] * S
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(outs, dim=2), S


@functools.lru_cache(maxsize=32)
def _upper(C: int, device: torch.device) -> Tensor:
    """(C, C) strictly upper-triangular mask (cached: building it is a parallel op that stalls on a busy machine)."""
    return torch.ones(C, C, dtype=torch.bool, device=device).triu(1)


def _pad_time(x: Tensor, pad: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


def _chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, S0: Tensor, C: int) -> tuple[Tensor, Tensor]:
    # Segments of SEGMENT_CHUNKS chunks keep the working set (and the no-grad peak memory) the same at any length.
    T = q.shape[2]
    seg = C * SEGMENT_CHUNKS
    if T <= seg:
        return _chunked_segment(q, k, v, g, S0, C)
    outs = []
    for i in range(0, T, seg):
        gi = g if g is None or g.shape[-1] == 1 else g[..., i : i + seg]
        o, S0 = _chunked_segment(q[:, :, i : i + seg], k[:, :, i : i + seg], v[:, :, i : i + seg], gi, S0, C)
        outs.append(o)
    return torch.cat(outs, dim=2), S0


def _chunked_segment(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, S0: Tensor, C: int
) -> tuple[Tensor, Tensor]:
    B, H, T, F = q.shape
    C = max(1, min(C, T))
    pad = (-T) % C
    N = (T + pad) // C
    qc = _pad_time(q, pad).view(B, H, N, C, F)
    kc = _pad_time(k, pad).view(B, H, N, C, F)
    vc = _pad_time(v, pad).view(B, H, N, C, v.shape[-1])
    scores = qc @ kc.transpose(-1, -2)  # (B, H, N, C, C)
    upper = _upper(C, q.device)
    if g is None:
        o = scores.masked_fill(upper, 0.0) @ vc
        U = kc.transpose(-1, -2) @ vc  # (B, H, N, F, Dv): each chunk's contribution
        # exclusive prefix sum over chunks: the state each chunk starts from
        prev = torch.cat([S0.expand(B, -1, -1, -1)[:, :, None], U[:, :, :-1]], dim=2).cumsum(2)
        o = o.add_(qc @ prev)
        return o.reshape(B, H, N * C, -1)[:, :, :T], prev[:, :, -1] + U[:, :, -1]
    if g.shape[-1] == 1 and T > 1 and pad:
        g = g.expand(-1, -1, T)  # padded positions must not decay: take the per-token path
    if g.shape[-1] == 1:  # constant per head: the within-chunk decays are the same for every chunk
        b = g[..., None] * torch.arange(1, C + 1, device=q.device, dtype=g.dtype)  # (1, H, 1, C)
    else:
        b = torch.nn.functional.pad(g, (0, pad)).view(g.shape[0], H, N, C).cumsum(-1)  # (B|1, H, N, C)
    tot = b[..., -1:]  # log decay across a whole chunk
    D = (b[..., :, None] - b[..., None, :]).masked_fill(upper, float("-inf")).exp()  # <= 1
    # in place where autograd allows (D needs no gradient): one pass less over the (C, C) scores
    o = (scores * D if D.requires_grad else scores.mul_(D)) @ vc
    U = (kc * (tot - b).exp()[..., None]).transpose(-1, -2) @ vc  # contribution decayed to the chunk end
    a = tot.exp().expand(B, H, N, 1)[..., None].unbind(2)  # N x (B, H, 1, 1)
    S = S0.expand(B, -1, -1, -1)
    prev = []
    # the only sequential part: N = T / C small steps on an F x Dv state (unbind, not indexing: indexing's
    # backward would write a full-size zero gradient per step)
    for a_n, U_n in zip(a, U.unbind(2)):
        prev.append(S)
        S = torch.addcmul(U_n, a_n, S)
    o = o.add_((qc * b.exp()[..., None]) @ torch.stack(prev, dim=2))
    return o.reshape(B, H, N * C, -1)[:, :, :T], S


def state_numbers(heads: int, features: int, value_dim: int, normalize: bool) -> int:
    """Numbers in one sequence's state: ``H * F * (Dv + 1)`` when normalized, ``H * F * Dv`` otherwise."""
    return heads * features * (value_dim + int(normalize))


# --------------------------------------------------------------------------------------------------------------
# Per-feature softmax over the prefix (LightNet's additive recurrence, Agent attention's agent step)


class SoftmaxState(NamedTuple):
    """Carried state of :func:`cumulative_softmax_attention` with per-feature reference ``ref``.

    ``num (B, H, F, Dv) = sum_j exp(s_j - ref) v_j``, ``den (B, H, F) = sum_j exp(s_j - ref)``, ``ref (B, H, F)``.
    """

    num: Tensor
    den: Tensor
    ref: Tensor


def cumulative_softmax_attention(
    q: Tensor,
    s: Tensor,
    v: Tensor,
    *,
    state: SoftmaxState | None = None,
    mode: str = "chunked",
    chunk: int | None = None,
) -> tuple[Tensor, SoftmaxState]:
    """``o_t = sum_m q_tm * sum_{j<=t} softmax_{j<=t}(s_{.m})_j v_j`` (per-feature softmax over the prefix).

    Args: q, s ``(B, H, T, F)``, v ``(B, H, T, Dv)``; ``state`` from a previous call.
    Returns: o ``(B, H, T, Dv)`` and the new :class:`SoftmaxState`.

    Exponents are taken against a running per-feature maximum (per chunk in chunked mode), so nothing
    overflows; chunked mode loses precision only if a feature's logit rises by more than ~80 (fp32) within a
    single chunk above everything seen before it.
    """
    B, H, T, F, Dv = _check(q, s, v)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dtype = q.dtype
    wd = _work_dtype(q.dtype)
    q, s, v = q.to(wd), s.to(wd), v.to(wd)
    if state is None:
        state = SoftmaxState(
            q.new_zeros(B, H, F, Dv), q.new_zeros(B, H, F), q.new_full((B, H, F), float("-inf"))
        )
    state = SoftmaxState(*(t.to(wd) for t in state))
    if mode == "parallel":
        o, state = _softmax_parallel(q, s, v, state)
    elif mode == "recurrent":
        o, state = _softmax_recurrent(q, s, v, state)
    else:
        o, state = _softmax_chunked(q, s, v, state, chunk or DEFAULT_CHUNK.get(q.device.type, 64))
    return o.to(out_dtype), state


def _rescale(old_ref: Tensor, new_ref: Tensor) -> Tensor:
    """exp(old - new) with exp(-inf - x) = 0 and no NaN when both are -inf."""
    return torch.where(torch.isneginf(old_ref), torch.zeros_like(old_ref), (old_ref - new_ref).exp())


def _softmax_parallel(q: Tensor, s: Tensor, v: Tensor, st: SoftmaxState) -> tuple[Tensor, SoftmaxState]:
    # the plain form: a (T, T) weight matrix per feature, the carried state as one extra "key"
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logits = s.transpose(-1, -2)[..., None, :].expand(-1, -1, -1, T, -1)  # (B, H, F, T_query, T_key)
    logits = logits.masked_fill(~causal, float("-inf"))
    tiny = torch.finfo(q.dtype).tiny
    past = st.den.clamp_min(tiny).log() + st.ref  # (B, H, F): log of the carried weight
    past = past.masked_fill(st.den <= 0, float("-inf"))[..., None, None].expand(-1, -1, -1, T, 1)
    w = torch.softmax(torch.cat([past, logits], dim=-1), dim=-1)  # (B, H, F, T, 1 + T)
    past_mean = st.num / st.den.clamp_min(tiny)[..., None]  # (B, H, F, Dv)
    per_feature = w[..., 1:] @ v[:, :, None] + w[..., :1] * past_mean[:, :, :, None, :]  # (B, H, F, T, Dv)
    o = torch.einsum("bhtf,bhftd->bhtd", q, per_feature)
    ref = torch.maximum(st.ref, s.amax(2))
    e = (s - ref[:, :, None]).exp()
    scale = _rescale(st.ref, ref)
    num = scale[..., None] * st.num + e.transpose(-1, -2) @ v
    den = scale * st.den + e.sum(2)
    return o, SoftmaxState(num, den, ref)


def _softmax_recurrent(q: Tensor, s: Tensor, v: Tensor, st: SoftmaxState) -> tuple[Tensor, SoftmaxState]:
    num, den, ref = st
    outs = []
    for t in range(q.shape[2]):
        st_ = s[:, :, t]
        new_ref = torch.maximum(ref, st_)
        scale = _rescale(ref, new_ref)
        e = (st_ - new_ref).exp()
        num = scale[..., None] * num + e[..., None] * v[:, :, t, None, :]
        den = scale * den + e
        ref = new_ref
        outs.append(((q[:, :, t] / den)[:, :, None, :] @ num)[:, :, 0])
    return torch.stack(outs, dim=2), SoftmaxState(num, den, ref)


def _softmax_chunked(q: Tensor, s: Tensor, v: Tensor, st: SoftmaxState, C: int) -> tuple[Tensor, SoftmaxState]:
    B, H, T, F = q.shape
    C = max(1, min(C, T))
    pad = (-T) % C
    N = (T + pad) // C
    qc = _pad_time(q, pad).view(B, H, N, C, F)
    # padded keys get -inf logits: weight exactly zero
    sc = torch.nn.functional.pad(s, (0, 0, 0, pad), value=float("-inf")).view(B, H, N, C, F)
    vc = _pad_time(v, pad).view(B, H, N, C, v.shape[-1])
    # reference per chunk: running max over everything up to the chunk's end
    ref = torch.maximum(sc.amax(3).cummax(2).values, st.ref[:, :, None])  # (B, H, N, F)
    ref_prev = torch.cat([st.ref[:, :, None], ref[:, :, :-1]], dim=2)
    e = (sc - ref[:, :, :, None]).exp()  # (B, H, N, C, F), <= 1
    carry = _rescale(ref_prev, ref)  # (B, H, N, F): old state -> this chunk's reference
    U = e.transpose(-1, -2) @ vc  # (B, H, N, F, Dv)
    Z = e.sum(3)  # (B, H, N, F)
    num, den = st.num, st.den
    nums, dens = [], []
    for c_n, U_n, Z_n in zip(carry.unbind(2), U.unbind(2), Z.unbind(2)):
        num = c_n[..., None] * num
        den = c_n * den
        nums.append(num)
        dens.append(den)
        num = num + U_n
        den = den + Z_n
    prev_num = torch.stack(nums, dim=2)  # carried state at this chunk's reference
    prev_den = torch.stack(dens, dim=2)
    den_t = prev_den[:, :, :, None] + e.cumsum(3)  # (B, H, N, C, F)
    qn = qc / den_t.clamp_min(torch.finfo(q.dtype).tiny)
    upper = _upper(C, q.device)
    o = (qn @ e.transpose(-1, -2)).masked_fill(upper, 0.0) @ vc + qn @ prev_num
    return o.reshape(B, H, N * C, -1)[:, :, :T], SoftmaxState(num, den, ref[:, :, -1])


# --------------------------------------------------------------------------------------------------------------
# Mega's EMA


def ema(
    u: Tensor,
    alpha: Tensor,
    delta: Tensor,
    eta: Tensor,
    *,
    state: Tensor | None = None,
    mode: str = "parallel",
) -> tuple[Tensor, Tensor]:
    """Multi-dimensional damped EMA (Mega, L190): ``h_t = alpha * u_t + (1 - alpha * delta) * h_{t-1}``,
    ``y_t = sum_n eta_n h_t,n`` per channel.

    Args:
        u: ``(B, T, D)`` inputs (already expanded by Mega's beta if used: pass ``u`` per channel).
        alpha, delta: ``(D, N)`` in (0, 1) (Mega applies a sigmoid to its parameters); eta ``(D, N)``.
        state: ``(B, D, N)`` hidden EMA state from a previous call.
        mode: ``"parallel"`` (causal convolution by FFT, ``O(T log T)``) or ``"recurrent"``.
    Returns: ``y (B, T, D)`` and the new state ``(B, D, N)``.
    """
    if u.dim() != 3 or alpha.shape != delta.shape or alpha.shape != eta.shape or alpha.shape[0] != u.shape[-1]:
        raise ValueError(f"expected u (B, T, D) and alpha, delta, eta (D, N); got {tuple(u.shape)}, {tuple(alpha.shape)}")
    B, T, D = u.shape
    out_dtype = u.dtype
    wd = _work_dtype(u.dtype)
    u, alpha, delta, eta = (t.to(wd) for t in (u, alpha, delta, eta))
    log_a = torch.log1p(-alpha * delta)  # (D, N), log of the damping factor, < 0
    if state is None:
        state = u.new_zeros(B, *alpha.shape)
    state = state.to(wd)
    if mode == "recurrent":
        a = log_a.exp()
        h = state
        ys = []
        for t in range(T):
            h = alpha * u[:, t, :, None] + a * h
            ys.append((h * eta).sum(-1))
        return torch.stack(ys, dim=1).to(out_dtype), h
    if mode != "parallel":
        raise ValueError(f"ema mode must be 'parallel' or 'recurrent', got {mode!r}")
    j = torch.arange(T, device=u.device, dtype=wd)
    powers = (j[:, None, None] * log_a).exp()  # (T, D, N): a^j, never overflows
    kernel = (powers * alpha * eta).sum(-1)  # (T, D): y = kernel * u (causal convolution)
    n = 1 << math.ceil(math.log2(2 * T))
    y = torch.fft.irfft(torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(kernel, n=n, dim=0), n=n, dim=1)[:, :T]
    y = y + torch.einsum("tdn,bdn->btd", powers * log_a.exp() * eta, state)  # the initial state, decayed
    # final state: a^T h_0 + sum_j a^(T-1-j) alpha u_j
    h = (T * log_a).exp() * state + alpha * torch.einsum("tdn,btd->bdn", powers.flip(0), u)
    return y.to(out_dtype), h


__all__ = [
    "linear_attention",
    "cumulative_softmax_attention",
    "SoftmaxState",
    "ema",
    "state_numbers",
    "MODES",
    "DEFAULT_CHUNK",
]
