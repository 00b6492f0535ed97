"""Light Forcing [P281]: sparse attention for chunk-autoregressive video diffusion.

Tokens sit on a ``(t, h, w)`` grid in raster order: frames of ``h * w`` tokens, chunks of ``chunk_frames``
frames. Attention is *chunk-causal*: every query of chunk ``c`` sees every key of chunks ``<= c`` (inside a chunk
both ways, as a chunk is denoised together). Keys are cut into blocks of ``block`` consecutive tokens inside a
frame (``block`` divides ``h * w``); queries into blocks of the same size.

Two parts, read from the paper's method section:

* **Chunk-Aware Growth (CAG)**. Chunk ``i``'s sparsity is ``s_i = s_base - alpha_i * beta`` with ``alpha_i`` the
  noise level the chunk reaches, ``alpha_i ~ 1/sqrt(t)``; ``beta`` is set so the FLOPs equal those of a
  chunk-agnostic policy at the target sparsity. Later chunks are sparser (they inherit earlier chunks' context).
  Our conventions: ``t`` is the chunk index (chunk ``i`` continues the denoising of the ``i`` chunks before it),
  so ``alpha_i = 1 / sqrt(i)`` for ``i >= 1``; densities ``d_i = 1 - s_i = clip(base_density + beta * alpha_i,
  0, 1)``; FLOPs are the selectable history keys (``sum_i d_i * S_i = budget * sum_i S_i``, ``S_i`` the
  selectable history frames of chunk ``i``), solved for ``beta >= 0`` by bisection. Chunk 0 has no history.
* **Hierarchical Sparse Attention (HSA)**, coarse to fine, per query block (pooled query ``mean(Q_blk)``):
  frame level: score each selectable history frame by ``<mean(Q_blk), mean(K_frame)>`` and keep the best
  ``n_frames``; block level: score the key blocks of the kept frames by ``<mean(Q_blk), mean(K_blk)>`` and keep
  the best ``n_keep``. Local context is always attended: the query's own chunk and the ``local_frames`` history
  frames just before it. ``n_keep = ceil(d_c * S_c * blocks_per_frame)`` and ``n_frames = min(S_c,
  ceil(frame_ratio * n_keep / blocks_per_frame))`` (our convention: the coarse stage keeps ``frame_ratio`` times
  the frames the kept blocks need).

``budget=1`` is dense chunk-causal attention. The selection is per query head (grouped kv heads shared) and is not
differentiated; the attention over the selected blocks runs on the sparse engine (``core.sparse.plan_blocks``:
whole blocks, no partial masks) and is exact in value and gradient.

Decoding runs chunk by chunk: queries of whole chunks at ``q_offset`` (a chunk boundary), keys up to the end of
the last query chunk. The growth schedule is solved over the whole video, so a decoding call needs ``chunks`` (the
video's number of chunks); a full forward takes it from the key length.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from attnlab.core.checks import check_qkv, positive_int
from attnlab.core.reference import reference_attention
from attnlab.ops._engine import plan_blocks, run
from attnlab.ops.registry import register_op
from attnlab.ops.sparse import check_mask

# ---- chunk-aware growth ----------------------------------------------------------------------------------------


def selectable_frames(chunk: int, chunk_frames: int, local_frames: int) -> int:
    """History frames of chunk ``chunk`` that compete in the selection (history minus the local frames)."""
    return max(0, chunk * chunk_frames - local_frames)


def growth_schedule(chunks: int, budget: float, base_density: float = 0.0, chunk_frames: int = 1,
                    local_frames: int = 0) -> list[float]:
    """Density of each chunk's selectable history, ``d_i = clip(base_density + beta / sqrt(i), 0, 1)`` with
    ``beta >= 0`` such that ``sum_i d_i S_i = budget * sum_i S_i`` (chunk 0, with no history: 1.0)."""
    w = [selectable_frames(i, chunk_frames, local_frames) for i in range(chunks)]
    if budget >= 1.0 or sum(w) == 0:
        return [1.0] * chunks

    def dens(beta: float) -> list[float]:
        return [1.0] + [min(1.0, max(0.0, base_density + beta / math.sqrt(i))) for i in range(1, chunks)]

    def flops(beta: float) -> float:
        return sum(d * wi for d, wi in zip(dens(beta), w))

    target = budget * sum(w)
    lo, hi = 0.0, (1.0 - base_density) * math.sqrt(max(chunks, 1)) + 1.0  # hi: every chunk dense
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if flops(mid) < target else (lo, mid)
    return dens(hi)


# ---- hierarchical selection ------------------------------------------------------------------------------------


def _check(frame, chunk_frames, block, budget, base_density, frame_ratio, local_frames, chunks) -> tuple[int, int]:
    if not (isinstance(frame, (tuple, list)) and len(frame) == 2):
        raise ValueError(f"frame must be (h, w), got {frame!r}")
    h, w = (positive_int("frame", int(x)) for x in frame)
    positive_int("chunk_frames", chunk_frames)
    positive_int("block", block)
    if (h * w) % block:
        raise ValueError(f"block must divide the frame's h * w = {h * w} tokens, got {block}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget!r}")
    if isinstance(base_density, bool) or not isinstance(base_density, (int, float)) or not 0.0 <= base_density < 1:
        raise ValueError(f"base_density must be in [0, 1), got {base_density!r}")
    if budget < 1.0 and base_density >= budget:
        raise ValueError(f"base_density ({base_density}) must be below budget ({budget}): growth adds density")
    if isinstance(frame_ratio, bool) or not isinstance(frame_ratio, (int, float)) or frame_ratio < 1.0:
        raise ValueError(f"frame_ratio must be a number >= 1, got {frame_ratio!r}")
    if isinstance(local_frames, bool) or not isinstance(local_frames, int) or local_frames < 0:
        raise ValueError(f"local_frames must be a non-negative integer, got {local_frames!r}")
    if chunks is not None:
        positive_int("chunks", chunks)
    return h * w, chunk_frames * h * w


def _geometry(Tq: int, Tk: int, q_offset: int, hw: int, chunk_tokens: int, block: int,
              chunks: int | None) -> int:
    """Checks the call's geometry; returns the number of chunks the schedule is solved over."""
    if q_offset % chunk_tokens or Tq % chunk_tokens or q_offset + Tq != Tk:
        raise ValueError(
            f"light_forcing runs whole chunks: q_offset ({q_offset}) and q length ({Tq}) must be multiples of the "
            f"chunk's {chunk_tokens} tokens and the keys must end with the queries (k length {Tk})")
    if chunks is None:
        if q_offset:
            raise ValueError("chunks (the video's number of chunks) must be given when decoding (q_offset > 0): "
                             "the growth schedule is solved over the whole video")
        return Tk // chunk_tokens
    if Tk > chunks * chunk_tokens:
        raise ValueError(f"chunks={chunks} is fewer than the {Tk // chunk_tokens} chunks in the keys")
    return chunks


def _pool(x: Tensor, size: int) -> Tensor:
    """(B, H, T, D) -> (B, H, T / size, D): mean of each run of ``size`` rows."""
    B, H, T, D = x.shape
    return x.view(B, H, T // size, size, D).mean(3)


def select_blocks(q: Tensor, k: Tensor, *, q_offset: int, frame=(2, 2), chunk_frames: int = 2, block: int = 2,
                  budget: float = 0.5, base_density: float = 0.0, frame_ratio: float = 2.0, local_frames: int = 1,
                  chunks: int | None = None) -> Tensor:
    """Key blocks read by each query block: q (B, H, Tq, D), k (B, Hkv, Tk, D) -> bool (B, H, Tq/block, Tk/block)."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    hw, ct = _check(frame, chunk_frames, block, budget, base_density, frame_ratio, local_frames, chunks)
    n_chunks = _geometry(Tq, Tk, q_offset, hw, ct, block, chunks)
    dens = growth_schedule(n_chunks, budget, base_density, chunk_frames, local_frames)
    bpf, G, nkb, nf = hw // block, Tq // block, Tk // block, Tk // hw
    with torch.no_grad():
        qbar = _pool(q, block).view(B, Hkv, H // Hkv, G, D)
        kf = _pool(k, hw).unsqueeze(2)  # (B, Hkv, 1, nf, D)
        kb = _pool(k, block).unsqueeze(2)  # (B, Hkv, 1, nkb, D)
        fscore = (qbar @ kf.transpose(-1, -2)).view(B, H, G, nf)
        bscore = (qbar @ kb.transpose(-1, -2)).view(B, H, G, nkb)
        keep = torch.zeros(B, H, G, nkb, dtype=torch.bool, device=q.device)
        qchunk = (torch.arange(G, device=q.device) * block + q_offset) // ct  # (G,)
        kframe = torch.arange(nkb, device=q.device) // bpf  # (nkb,) frame of each key block
        for c in qchunk.unique().tolist():
            rows = (qchunk == c).nonzero().flatten()
            S = selectable_frames(c, chunk_frames, local_frames)
            local = (kframe >= max(0, c * chunk_frames - local_frames)) & (kframe < (c + 1) * chunk_frames)
            keep[:, :, rows] |= local.view(1, 1, 1, nkb)  # local frames + own chunk (nothing later)
            if S == 0:
                continue
            n_keep = min(S * bpf, math.ceil(dens[c] * S * bpf - 1e-9))
            n_frames = min(S, math.ceil(frame_ratio * n_keep / bpf - 1e-9))
            if n_keep == 0:
                continue
            top_f = fscore[:, :, rows, :S].topk(n_frames, dim=-1).indices  # (B, H, g, n_frames)
            fsel = torch.zeros(B, H, len(rows), nf, dtype=torch.bool, device=q.device).scatter_(-1, top_f, True)
            cand = fsel[..., kframe]  # (B, H, g, nkb): blocks of the kept frames
            s = bscore[:, :, rows].masked_fill(~cand, float("-inf"))
            top_b = s.topk(n_keep, dim=-1).indices
            keep[:, :, rows] |= torch.zeros_like(cand).scatter_(-1, top_b, True)
    return keep


def _block_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, G, nkb) bool -> (index, valid), each (B, H, G, n) with n the largest row count."""
    n = max(1, int(keep.sum(-1).max()))
    val, idx = keep.to(torch.int8).sort(dim=-1, descending=True, stable=True)
    return idx[..., :n].contiguous(), val[..., :n].bool()


def light_forcing_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, **options: Any) -> Tensor:
    """Chunk-causal Light Forcing attention on the sparse engine: q (B, H, Tq, D), k, v (B, Hkv, Tk, D) ->
    (B, H, Tq, Dv)."""
    B, H, Hkv, Tq, Tk, D = check_qkv(q, k, v)
    keep = select_blocks(q, k, q_offset=q_offset, **options)
    idx, valid = _block_index(keep)
    block = options["block"]
    plan = plan_blocks(idx, valid, block, block, Tq, Tk, Hkv, q_offset, causal=False)
    return run(q, k, v, plan, scale)


def light_forcing_mask(q: Tensor, k: Tensor, *, q_offset: int, scale: float | None = None, state=None,
                       **options: Any) -> Tensor:
    """The selection as a dense bool (B, H, Tq, Tk) mask (each query block's key blocks, token by token)."""
    keep = select_blocks(q, k, q_offset=q_offset, **options)
    b = options["block"]
    return keep.repeat_interleave(b, dim=2).repeat_interleave(b, dim=3)


OPTIONS = {"frame": (2, 2), "chunk_frames": 2, "block": 2, "budget": 0.5, "base_density": 0.0, "frame_ratio": 2.0,
           "local_frames": 1, "chunks": None}


@register_op(
    "light_forcing", family="routing", papers=("P281",), options=OPTIONS, weights_mask=light_forcing_mask,
    decodes=False,  # chunk-causal: decodes chunk by chunk (tests/routing/test_light_forcing.py), not token by token
    summary="Light Forcing: chunk-causal video attention; chunk-aware growth of density over chunks, frame-level "
            "then block-level top-k over the history plus local context",
    example={"frame": (2, 2), "chunk_frames": 1, "block": 2, "budget": 0.4, "local_frames": 0, "frame_ratio": 1.0},
)
def light_forcing_op(q: Tensor, k: Tensor, v: Tensor, *, scale: float, q_offset: int, mask: Tensor | None = None,
                     state: Any = None, **options: Any):
    """Light Forcing over a raster ``(t, h, w)`` grid (``frame = (h, w)``): q (B, H, Tq, D), k, v (B, Hkv, Tk, D).

    A free ``mask`` is ANDed with the selection (the call then runs densely over ``selection & mask``).
    """
    if mask is not None:
        check_mask("light_forcing", mask, q, k)
        if bool(mask.all()):
            mask = None
    if mask is not None:
        with torch.no_grad():
            sel = light_forcing_mask(q, k, q_offset=q_offset, **options)
        out = reference_attention(q, k, v, scale=scale, q_offset=q_offset, mask=sel & mask, dtype=None).to(v.dtype)
    else:
        out = light_forcing_attention(q, k, v, scale=scale, q_offset=q_offset, **options)
    return out if state is None else (out, state)


def chunk_causal_mask(T: int, chunk_tokens: int, device=None) -> Tensor:
    """(T, T) bool: key chunk <= query chunk (dense chunk-causal attention)."""
    c = torch.arange(T, device=device) // chunk_tokens
    return c.view(1, T) <= c.view(T, 1)


def synthetic_video(frames: int, frame: tuple[int, int], heads: int = 4, head_dim: int = 64, salient: int = 2,
                    seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Structured q, k, v (1, heads, frames*h*w, head_dim): each frame's keys share a frame code (temporal
    coherence: codes drift slowly), ``salient`` random frames carry a code aligned with the queries' (a planted
    long-range dependency), plus token noise."""
    g = torch.Generator().manual_seed(seed)
    hw = frame[0] * frame[1]
    T = frames * hw
    codes = torch.randn(heads, frames, head_dim, generator=g).cumsum(1) / math.sqrt(frames)  # slow drift
    target = torch.randn(heads, 1, head_dim, generator=g)
    hot = torch.randperm(max(1, frames // 2), generator=g)[:salient]
    codes[:, hot] += 3.0 * target
    k = codes.repeat_interleave(hw, 1) + 0.5 * torch.randn(heads, T, head_dim, generator=g)
    q = target.expand(heads, T, head_dim) + codes.repeat_interleave(hw, 1) + 0.5 * torch.randn(heads, T, head_dim,
                                                                                                   generator=g)
    v = torch.randn(heads, T, head_dim, generator=g)
    return 2 * q.unsqueeze(0) / head_dim**0.25, k.unsqueeze(0) / head_dim**0.25, v.unsqueeze(0)  # sharp rows


def measure(budgets=(1.0, 0.5, 0.3, 0.1), frames: int = 24, frame: tuple[int, int] = (16, 16), chunk_frames: int = 3,
            block: int = 64, rounds: int = 5, **options: Any) -> list[dict[str, float]]:
    """Per budget on :func:`synthetic_video` (float32): density (kept query-key pairs / chunk-causal pairs), the
    output's relative L2 error vs dense chunk-causal attention, and the time ratio dense / Light Forcing (dense:
    SDPA with the chunk-causal bool mask)."""
    from attnlab.bench.common import time_pair

    q, k, v = synthetic_video(frames, frame)
    T = q.shape[2]
    cm = chunk_causal_mask(T, chunk_frames * frame[0] * frame[1])
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=cm)
    rows = []
    for budget in budgets:
        opts = {**OPTIONS, **options, "frame": frame, "chunk_frames": chunk_frames, "block": block, "budget": budget}
        keep = select_blocks(q, k, q_offset=0, **opts)
        density = float(keep.float().mean()) * keep.shape[-1] * keep.shape[-2] / float(cm.sum()) * block * block
        out = light_forcing_attention(q, k, v, scale=q.shape[-1] ** -0.5, q_offset=0, **opts)
        err = float((out - dense).norm() / dense.norm())
        _, _, ratio = time_pair(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=cm),
            lambda o=opts: light_forcing_attention(q, k, v, scale=q.shape[-1] ** -0.5, q_offset=0, **o), rounds=rounds)
        rows.append({"budget": budget, "density": density, "rel_err": err, "dense_over_lf": ratio})
    return rows


__all__ = ["chunk_causal_mask", "growth_schedule", "light_forcing_attention", "light_forcing_mask",
           "light_forcing_op", "measure", "select_blocks", "selectable_frames", "synthetic_video"]
