"""Agent attention, the paper's non-causal form (R55): agents pooled from the queries, agent biases, and the
depthwise-convolution term.

    A   = pool(Q)                                   (n agents per head: adaptive average pooling of the queries,
                                                     1-D over the sequence or 2-D over a ``grid``)
    V_A = softmax(A K^T * scale + B1) V             (agent aggregation; B1 ``bias_agent`` (H, n, Tk))
    O   = softmax(Q A^T * scale + B2) V_A + DWC(V)  (agent broadcast; B2 ``bias_query`` (H, Tq, n))

``DWC`` is a depthwise convolution of the values (``dwc`` weights ``(H, D, k)`` over the sequence, or
``(H, D, kh, kw)`` over the grid; odd kernels, zero padding, output at the input's positions). Cost
``O((Tq + Tk) n d)``: linear in length for a fixed number of agents.

The agents see every query, so the form is bidirectional (images, diffusion): it does not decode. The causal
form with learned agents is the ``agent`` layer (``agent.py``, op ``cumulative_softmax``). Pooling bins follow
adaptive average pooling: agent ``m`` of ``n`` over ``T`` positions averages ``floor(m T / n) .. ceil((m + 1) T / n)
- 1``; on a grid, the product of the per-axis bins. The paper builds B1 / B2 from decomposed position biases;
here they are free tensors (a layer builds them from its own parameters).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.ops.registry import register_op

from ...core.checks import positive_int
from ..layers._scored import repeat_kv


def _grid(grid, T: int, name: str) -> tuple[int, ...] | None:
    if grid is None:
        return None
    g = (grid,) if isinstance(grid, int) else tuple(grid)
    if len(g) not in (1, 2) or math.prod(g) != T:
        raise ValueError(f"grid must be 1 or 2 ints with product {name} = {T}, got {grid!r}")
    return tuple(positive_int(f"grid[{i}]", x) for i, x in enumerate(g))


def _agent_shape(agents, grid: tuple[int, ...] | None) -> tuple[int, ...]:
    nd = 1 if grid is None else len(grid)
    a = (agents,) * nd if isinstance(agents, int) else tuple(agents)
    if len(a) != nd:
        raise ValueError(f"agents must be an int or {nd} ints (one per grid axis), got {agents!r}")
    for i, x in enumerate(a):
        positive_int(f"agents[{i}]", x)
        L = grid[i] if grid is not None else None
        if L is not None and x > L:
            raise ValueError(f"agents[{i}] = {x} exceeds the grid axis length {L}")
    return a


def _check(q: Tensor, k: Tensor, v: Tensor, mask, agents, grid, bias_agent, bias_query, dwc):
    if mask is not None:
        raise ValueError("op 'agent_pooled' does not take a free mask (its agents pool every query)")
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    g = _grid(grid, Tq, "q_len")
    a = _agent_shape(agents, g)
    if g is None and a[0] > Tq:
        raise ValueError(f"agents = {a[0]} exceeds q_len = {Tq}")
    n = math.prod(a)
    for name, t, shape in (("bias_agent", bias_agent, (H, n, Tk)), ("bias_query", bias_query, (H, Tq, n))):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else repr(t)
            raise ValueError(f"{name} must be a tensor of shape {shape}, got {got}")
    if dwc is not None:
        nd = 1 if g is None else len(g)
        if Tq != Tk:
            raise ValueError(f"dwc adds a convolution of v to the output rows: needs q_len == kv_len, got {Tq}, {Tk}")
        if not isinstance(dwc, Tensor) or dwc.dim() != 2 + nd or tuple(dwc.shape[:2]) != (H, v.shape[-1]) \
                or any(s % 2 == 0 for s in dwc.shape[2:]):
            got = tuple(dwc.shape) if isinstance(dwc, Tensor) else repr(dwc)
            raise ValueError(f"dwc must be a tensor (H={H}, Dv={v.shape[-1]}, {nd} odd kernel sizes), got {got}")
    return g, a


def _pool(q: Tensor, g: tuple[int, ...] | None, a: tuple[int, ...]) -> Tensor:
    """(B, H, T, D) -> (B, H, n, D) adaptive average pooling over the sequence or the grid."""
    B, H, T, D = q.shape
    if g is None or len(g) == 1:
        return F.adaptive_avg_pool1d(q.reshape(B * H, T, D).transpose(1, 2), a[0]).transpose(1, 2).view(B, H, -1, D)
    x = q.reshape(B * H, *g, D).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(x, a).permute(0, 2, 3, 1).reshape(B, H, -1, D)


def _dwc(v: Tensor, w: Tensor, g: tuple[int, ...] | None) -> Tensor:
    """Depthwise convolution of v (B, H, T, D) with w (H, D, *kernel), zero padding -> (B, H, T, D)."""
    B, H, T, D = v.shape
    w = w.to(v.dtype)
    if w.dim() == 3:
        x = v.permute(0, 1, 3, 2).reshape(B, H * D, T)
        y = F.conv1d(x, w.reshape(H * D, 1, -1), padding=w.shape[-1] // 2, groups=H * D)
        return y.view(B, H, D, T).permute(0, 1, 3, 2)
    x = v.permute(0, 1, 3, 2).reshape(B, H * D, *g)
    y = F.conv2d(x, w.reshape(H * D, 1, *w.shape[2:]), padding=(w.shape[2] // 2, w.shape[3] // 2), groups=H * D)
    return y.view(B, H, D, T).permute(0, 1, 3, 2)


def _bins(L: int, n: int) -> list[tuple[int, int]]:
    return [((m * L) // n, -((-(m + 1) * L) // n)) for m in range(n)]


def _agent_pooled_reference(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int,
                            mask: Tensor | None = None, agents=8, grid=None, bias_agent: Tensor | None = None,
                            bias_query: Tensor | None = None, dwc: Tensor | None = None) -> Tensor:
    """Float64, from the formula: agents as explicit means over their bins, the two softmaxes on dense scores,
    the convolution as a sum over kernel offsets of shifted values."""
    g, a = _check(q, k, v, mask, agents, grid, bias_agent, bias_query, dwc)
    H, Tq = q.shape[1], q.shape[2]
    q, k, v = q.double(), repeat_kv(k.double(), H), repeat_kv(v.double(), H)
    shape = g if g is not None else (Tq,)
    qg = q.reshape(*q.shape[:2], *shape, q.shape[-1])
    agent_list = []
    if len(shape) == 1:
        for s, e in _bins(shape[0], a[0]):
            agent_list.append(qg[:, :, s:e].mean(2))
    else:
        for s0, e0 in _bins(shape[0], a[0]):
            for s1, e1 in _bins(shape[1], a[1]):
                agent_list.append(qg[:, :, s0:e0, s1:e1].mean((2, 3)))
    A = torch.stack(agent_list, 2)  # (B, H, n, D)
    s1 = torch.einsum("bhmd,bhjd->bhmj", A, k) * scale
    if bias_agent is not None:
        s1 = s1 + bias_agent.double()
    va = torch.softmax(s1, -1) @ v
    s2 = torch.einsum("bhid,bhmd->bhim", q, A) * scale
    if bias_query is not None:
        s2 = s2 + bias_query.double()
    out = torch.softmax(s2, -1) @ va
    if dwc is not None:
        w = dwc.double()
        vg = v.reshape(*v.shape[:2], *shape, v.shape[-1])
        conv = torch.zeros_like(vg)
        if len(shape) == 1:
            r = w.shape[-1] // 2
            for o in range(-r, r + 1):  # out[t] += w[o] * v[t + o] where t + o is inside
                lo, hi = max(0, -o), min(shape[0], shape[0] - o)
                conv[:, :, lo:hi] += vg[:, :, lo + o:hi + o] * w[:, :, o + r].view(1, H, 1, -1)
        else:
            r0, r1 = w.shape[2] // 2, w.shape[3] // 2
            for o0 in range(-r0, r0 + 1):
                for o1 in range(-r1, r1 + 1):
                    a0, b0 = max(0, -o0), min(shape[0], shape[0] - o0)
                    a1, b1 = max(0, -o1), min(shape[1], shape[1] - o1)
                    conv[:, :, a0:b0, a1:b1] += (vg[:, :, a0 + o0:b0 + o0, a1 + o1:b1 + o1]
                                                 * w[:, :, o0 + r0, o1 + r1].view(1, H, 1, 1, -1))
        out = out + conv.reshape(out.shape)
    return out


@register_op("agent_pooled", family="linear", papers=("R55",), decodes=False,
             summary="Agent attention (non-causal): agents pooled from the queries, softmax(A K^T + B1) V then "
             "softmax(Q A^T + B2), plus a depthwise convolution of V; O((Tq + Tk) n d)",
             options={"agents": 8, "grid": None, "bias_agent": None, "bias_query": None, "dwc": None},
             reference=_agent_pooled_reference, example={"agents": 5})
def agent_pooled_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                    state: dict | None = None, agents=8, grid=None, bias_agent: Tensor | None = None,
                    bias_query: Tensor | None = None, dwc: Tensor | None = None) -> Tensor | tuple[Tensor, dict]:
    """q (B, H, Tq, D) over k, v (B, Hkv, Tk, D) -> (B, H, Tq, Dv). ``agents``: an int (per grid axis) or a tuple
    (agent grid); ``grid``: the queries' 2-D grid (None: 1-D). Bidirectional; ``q_offset`` is ignored."""
    g, a = _check(q, k, v, mask, agents, grid, bias_agent, bias_query, dwc)
    H = q.shape[1]
    A = _pool(q, g, a)  # (B, H, n, D)
    kr, vr = repeat_kv(k, H), repeat_kv(v, H)  # n x Tk scores per head: no Tq x Tk matrix anywhere
    s1 = (A @ kr.transpose(-1, -2)) * scale
    if bias_agent is not None:
        s1 = s1 + bias_agent.to(q.dtype)
    va = s1.softmax(-1) @ vr
    s2 = (q @ A.transpose(-1, -2)) * scale
    if bias_query is not None:
        s2 = s2 + bias_query.to(q.dtype)
    out = s2.softmax(-1) @ va
    if dwc is not None:
        out = out + _dwc(vr, dwc, g)
    return out if state is None else (out, state)


__all__ = ["agent_pooled_op"]
