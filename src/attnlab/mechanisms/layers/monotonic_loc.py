"""Monotonic location attention (paper L218, "Monotonic Location Attention for Length Generalization"), the
location attention of Dubois et al. made monotonic, optionally mixed with content attention.

Memory positions are normalized to ``x_j = j / (S - 1)`` so the same steps work at any source length. Decoder step
``i`` moves a Gaussian forward from the expected position of its previous location attention:

    step_i  = relu(q_i[0])                      (>= 0: each Gaussian centred at or after the last reference)
    sigma_i = (relu(q_i[1]) + sigma_min) / S    (width in normalized units; ``sigma_min`` keeps it positive)
    mu_i    = p_{i-1} + step_i / (S - 1)        (``p_{-1} = 0``: start at the first position)
    loc_i(j) = exp(-(x_j - mu_i)^2 / (2 sigma_i^2)), normalized over the visible memory positions (log domain)
    p_i     = sum_j loc_i(j) x_j                (the reference point of the next step)

With ``content=True`` the weights mix location and content: ``g_i = sigmoid(q_i[2])``,
``w_i = g_i loc_i + (1 - g_i) softmax_j(q_i . k_j * scale)``; otherwise ``w_i = loc_i``. ``out_i = sum_j w_ij v_j``.
A step of one position per decoder step (``relu(q_i[0]) = 1``) walks the memory one token at a time at every length
-- the length generalization the paper is after.

Conventions (ours): the step, width and gate are the first three query coordinates (a layer's position projections
write them there); the reference point is the location part's own expected position. The paper's OneStep variant
is not included. Sequential over decoder steps; ``state["pos"]`` carries ``p`` between calls (decoding over a fixed
memory).

**Reverse interpolation + relative attention** (op ``interp_relative``, the abstract's "simple approach"): the
memory is interpolated with its own reverse, ``k'_ij = g_i k_{S-1-j} + (1 - g_i) k_j`` (values alike), and decoder
step ``t = q_offset + i`` attends it with a relative-position score:

    s_ij = q_i . k'_ij * scale (``content=True``) + rel_bias[h, clip(j - t, -R, R) + R]
    out_i = sum_j softmax_j(s_ij) v'_ij

With the gate at 1 and the relative bias peaked at offset 0, step ``t`` reads position ``t`` of the reversed memory,
i.e. source token ``S - 1 - t``, at every source length (reverse lookup); gate 0 gives the forward lookup
(token ``t``). Conventions (ours; the method section was not available here): the gate ``g_i`` is
``sigmoid(q_i[0])`` unless given (``gate``, a number or a tensor broadcastable to (B, H, Tq), in [0, 1]); the
relative term is a learned scalar per head and clipped offset (``rel_bias`` (H, 2R + 1), Shaw/T5 style; None: no
positional term), offsets measured from the decoder step to the memory position; the decoder step is
``q_offset + i`` (the op registry's default ``q_offset`` is ``kv_len - q_len``: pass ``q_offset=0`` for a decoder
whose first query is step 0). Rows are independent, so
decoding in any chunks equals the full forward. Cost: two ``Tq x S`` score products (forward and reversed memory).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.ops.registry import register_op

from ...core.softmax import masked_softmax
from ._scored import check_free_mask, grouped_scores, repeat_kv


def _check(q: Tensor, k: Tensor, mask: Tensor | None, sigma_min: float, content: bool) -> None:
    check_free_mask("monotonic_loc", mask, q, k)
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, (int, float)) or not sigma_min > 0:
        raise ValueError(f"sigma_min must be a positive number, got {sigma_min!r}")
    if not isinstance(content, bool):
        raise ValueError(f"content must be True or False, got {content!r}")
    need = 3 if content else 2
    if q.shape[-1] < need:
        raise ValueError(f"monotonic_loc: head_dim {q.shape[-1]} < {need} (step, width{', gate' if content else ''})")


def _monotonic_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int,
                         mask: Tensor | None = None, sigma_min: float = 0.27, content: bool = True) -> Tensor:
    """Float64, step by step from the formula, one query row at a time."""
    _check(q, k, mask, sigma_min, content)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    q, k, v = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    x = torch.tensor([j / max(S - 1, 1) for j in range(S)], dtype=torch.float64)
    p = torch.zeros(B, H, 1, dtype=torch.float64)
    rows = []
    for i in range(Tq):
        qi = q[:, :, i]
        step = torch.clamp(qi[..., :1], min=0.0)
        sigma = (torch.clamp(qi[..., 1:2], min=0.0) + sigma_min) / S
        mu = p + step / max(S - 1, 1)
        allowed = torch.ones(1, 1, S, dtype=torch.bool) if mask is None else mask[:, :, i]
        logg = (-((x - mu) ** 2) / (2 * sigma * sigma)).masked_fill(~allowed, float("-inf"))
        g = torch.exp(logg - logg.max(-1, keepdim=True).values)  # normalized densities, shifted for range
        loc = torch.nan_to_num(g / g.sum(-1, keepdim=True), nan=0.0)
        p = (loc * x).sum(-1, keepdim=True)
        w = loc
        if content:
            s = torch.einsum("bhd,bhjd->bhj", qi, k) * scale
            s = s.masked_fill(~allowed, float("-inf"))
            c = torch.exp(s - s.max(-1, keepdim=True).values)
            c = torch.nan_to_num(c / c.sum(-1, keepdim=True), nan=0.0)
            gate = 1.0 / (1.0 + torch.exp(-qi[..., 2:3]))
            w = gate * loc + (1 - gate) * c
        rows.append(w)
    return torch.stack(rows, 2) @ v


@register_op("monotonic_loc", family="dense", papers=("L218",), decodes=False,
             summary="monotonic location attention: a Gaussian over normalized source positions that steps forward "
             "from the previous expected position (relu steps), optionally gated with content attention",
             options={"sigma_min": 0.27, "content": True}, reference=_monotonic_reference, example={})
def monotonic_loc_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                     state: dict | None = None, sigma_min: float = 0.27,
                     content: bool = True) -> Tensor | tuple[Tensor, dict]:
    """Decoder queries q (B, H, Tq, D >= 3) over the memory k, v (B, Hkv, S, D) -> (B, H, Tq, Dv); ``q_offset``
    unused (``state["pos"]`` carries the reference point)."""
    _check(q, k, mask, sigma_min, content)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    x = torch.arange(S, device=q.device, dtype=q.dtype) / max(S - 1, 1)
    step = torch.relu(q[..., 0]) / max(S - 1, 1)  # (B, H, Tq)
    sigma = (torch.relu(q[..., 1]) + sigma_min) / S
    p = q.new_zeros(B, H) if state is None or "pos" not in state else state["pos"].to(q.dtype)
    if p.shape != (B, H):
        raise ValueError(f"monotonic_loc: state holds positions of shape {tuple(p.shape)}, expected {(B, H)}")
    locs = []
    for i in range(Tq):  # each reference point is the previous step's expected position: sequential
        mu = p + step[:, :, i]
        z = (x - mu.unsqueeze(-1)) / sigma[:, :, i].unsqueeze(-1)
        loc = masked_softmax(-0.5 * z * z, None if mask is None else mask[:, :, i])  # log domain: no underflow
        p = loc @ x
        locs.append(loc)
    w = torch.stack(locs, 2)
    if content:
        c = masked_softmax(grouped_scores(q, k) * scale, None if mask is None else mask)
        gate = torch.sigmoid(q[..., 2:3])
        w = gate * w + (1 - gate) * c
    out = w @ repeat_kv(v, H)
    if state is None:
        return out
    state["pos"] = p
    return out, state


# ---- reverse interpolation + relative attention -----------------------------------------------------------


def _interp_check(q: Tensor, k: Tensor, mask: Tensor | None, gate: Any, rel_bias: Tensor | None,
                  content: bool) -> None:
    check_free_mask("interp_relative", mask, q, k)
    if not isinstance(content, bool):
        raise ValueError(f"content must be True or False, got {content!r}")
    if rel_bias is not None and (not isinstance(rel_bias, Tensor) or rel_bias.dim() != 2
                                 or rel_bias.shape[0] != q.shape[1] or rel_bias.shape[1] % 2 != 1):
        got = tuple(rel_bias.shape) if isinstance(rel_bias, Tensor) else repr(rel_bias)
        raise ValueError(f"rel_bias must be a tensor of shape (heads={q.shape[1]}, 2R + 1), got {got}")
    if gate is None:
        return
    if isinstance(gate, bool) or not isinstance(gate, (int, float, Tensor)):
        raise ValueError(f"gate must be None, a number or a tensor in [0, 1], got {gate!r}")
    g = torch.as_tensor(gate)
    if bool(((g < 0) | (g > 1)).any()):
        raise ValueError("gate must lie in [0, 1]")


def _gate(q: Tensor, gate: Any) -> Tensor:
    """(B|1, H|1, Tq, 1) interpolation weight of the reversed memory."""
    if gate is None:
        return torch.sigmoid(q[..., :1])
    g = torch.as_tensor(gate, dtype=q.dtype, device=q.device)
    return g.expand(q.shape[:3]).unsqueeze(-1) if g.dim() else g.view(1, 1, 1, 1)


def _interp_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                      gate: Any = None, rel_bias: Tensor | None = None, content: bool = True) -> Tensor:
    """Float64, row by row: build each row's interpolated memory explicitly (reversed index ``S - 1 - j``), score
    every position with the content and the clipped relative term, softmax over the visible positions."""
    _interp_check(q, k, mask, gate, rel_bias, content)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    q, k, v = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    g_all = _gate(q, gate if not isinstance(gate, Tensor) else gate.double()).expand(B, H, Tq, 1)
    R = 0 if rel_bias is None else (rel_bias.shape[1] - 1) // 2
    rows = []
    for i in range(Tq):
        g = g_all[:, :, i]  # (B, H, 1)
        rev = [S - 1 - j for j in range(S)]
        kk = g.unsqueeze(-1) * k[:, :, rev] + (1 - g.unsqueeze(-1)) * k  # (B, H, S, D)
        vv = g.unsqueeze(-1) * v[:, :, rev] + (1 - g.unsqueeze(-1)) * v
        score = torch.zeros(B, H, S, dtype=torch.float64)
        if content:
            score = score + torch.einsum("bhd,bhjd->bhj", q[:, :, i], kk) * scale
        if rel_bias is not None:
            t = q_offset + i
            idx = [min(max(j - t, -R), R) + R for j in range(S)]
            score = score + rel_bias.double()[:, idx].unsqueeze(0)
        allowed = torch.ones(1, 1, S, dtype=torch.bool) if mask is None else mask[:, :, i]
        w = torch.softmax(score.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        rows.append(torch.einsum("bhj,bhjd->bhd", w, vv))
    return torch.stack(rows, 2)


@register_op("interp_relative", family="dense", papers=("L218",), decodes=False,
             summary="reverse interpolation + relative attention: the memory mixed with its reverse by a gate, read "
             "with content + a clipped relative-position bias (forward and reverse lookup at any length)",
             options={"gate": None, "rel_bias": None, "content": True}, reference=_interp_reference, example={})
def interp_relative_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                       state: dict | None = None, gate: Any = None, rel_bias: Tensor | None = None,
                       content: bool = True) -> Tensor | tuple[Tensor, dict]:
    """Decoder queries q (B, H, Tq, D) at steps q_offset.. over the memory k, v (B, Hkv, S, D) -> (B, H, Tq, Dv);
    stateless. Scores against the interpolated memory are the gate's mix of the scores against the memory and
    against its reverse (both linear in the keys), and likewise the output."""
    _interp_check(q, k, mask, gate, rel_bias, content)
    B, H, Tq, _ = q.shape
    S = k.shape[2]
    g = _gate(q, gate)
    krev, vrev = k.flip(2), v.flip(2)
    s = q.new_zeros(1, 1, 1, 1)
    if content:
        s = (g * grouped_scores(q, krev) + (1 - g) * grouped_scores(q, k)) * scale
    if rel_bias is not None:
        R = (rel_bias.shape[1] - 1) // 2
        off = torch.arange(S, device=q.device) - (torch.arange(Tq, device=q.device) + q_offset).unsqueeze(-1)
        s = s + rel_bias.to(q.dtype)[:, off.clamp(-R, R) + R].unsqueeze(0)  # (1, H, Tq, S)
    w = masked_softmax(s.expand(B, H, Tq, S), mask)
    vr = repeat_kv(v, H)
    out = g * (w @ repeat_kv(vrev, H)) + (1 - g) * (w @ vr)
    return out if state is None else (out, state)


__all__ = ["interp_relative_op", "monotonic_loc_op"]
