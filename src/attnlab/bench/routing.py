"""``attnlab bench speed --sections routing``: content-based sparse attention that really skips work.

MoBA (causal, per-query top-k key blocks, 1/8 of the blocks selected) against SDPA causal, and BiFormer
(bi-level routing on a 2-D grid, 1/8 of the regions selected) against dense SDPA; forward (selection cost
included), forward + backward and (MoBA) one decoding step, a query row per head over the cached keys at 1/8 and
1/2 of the 64-key blocks; MInference's vertical-slash prefill at f = 0.25 and 0.125; plus the naive dense-mask
path (SDPA with the selection as a full boolean mask). Peak memory of BiFormer at two values of top-k shows memory
grows with the selected regions.
batch 1, 8 heads, head_dim 64; ratios are measured in the same run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..mechanisms.routing.biformer import biformer_attention, biformer_mask
from ..mechanisms.routing.minference import (
    vertical_slash_attention,
    vertical_slash_mask,
    vertical_slash_select,
)
from ..mechanisms.routing.moba import moba_attention, moba_mask, moba_select
from .common import Report, attention_flops, bench_qkv, fwd_bwd, median, peak_memory, time_fn, time_pair
from .speed import SpeedContext

HEADS, HEAD_DIM = 8, 64
DECODE_BLOCK, DECODE_CALLS = 64, 20  # a decoding step is short: each timed call runs 20 of them
COLUMNS = ["mechanism", "length", "selected", "pass", "baseline", "baseline_s", "attnlab_s", "speedup",
           "vs_dense_mask", "useful_gflops", "of_peak", "peak_mem_MiB"]


def _t(fn: Callable[[], object], quick: bool) -> float:
    return median(time_fn(fn, reps=2 if quick else 3, warmup=1, max_seconds=10.0))


def _pair(base: Callable[[], object], fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    """Baseline and attnlab alternated round by round; the speed-up is the median of the per-round ratios."""
    return time_pair(base, fn, rounds=2 if quick else 7, warmup=1, max_seconds=40.0)


def _moba_pairs(q: torch.Tensor, k: torch.Tensor, block: int, top_k: int) -> float:
    """Allowed pairs per head of MoBA's selection (past blocks are whole; the current block up to the query)."""
    sel, valid = moba_select(q, k, block, top_k, 0)
    T = q.shape[2]
    cur = torch.arange(T, device=q.device) % block + 1
    return float((valid[..., 1:].sum() * block + cur.sum() * q.shape[1]) / q.shape[1])


def run(ctx: SpeedContext) -> Report:
    rep = Report("routing", COLUMNS, meta={"heads": HEADS, "head_dim": HEAD_DIM, "batch": 1})
    n = (ctx.lengths or ((4096,) if ctx.quick else (8192,)))[0]
    dev, dt, quick = ctx.device, ctx.dtype, ctx.quick
    scale = HEAD_DIM**-0.5
    only = set(ctx.only or ("moba", "minference", "biformer"))

    def row(mech, sel, pas, base_name, tb, ta, sp, pairs, tmask=None, mem=None, backward=False):
        fl = attention_flops(pairs, 1, HEADS, HEAD_DIM, backward)
        rep.add(mechanism=mech, length=n, selected=sel, **{"pass": pas}, baseline=base_name, baseline_s=tb,
                attnlab_s=ta, speedup=sp, vs_dense_mask=(tmask / ta) if tmask else "",
                useful_gflops=fl / ta / 1e9, of_peak=fl / ta / 1e9 / ctx.peak_gflops,
                peak_mem_MiB=(mem / 2**20) if mem is not None else "")

    if "moba" in only:
        block = 512 if n >= 8192 else 256
        top_k = max(1, math.ceil(n / block) // 8)
        q, k, v = bench_qkv(n, dev, dt, heads=HEADS, head_dim=HEAD_DIM)
        moba = lambda: moba_attention(q, k, v, block, top_k, scale)  # noqa: E731
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: E731
        with torch.no_grad():
            mask = moba_mask(q, k, block, top_k, 0)
            naive = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # noqa: E731
            tb, ta, sp = _pair(sdpa, moba, quick)
            tm = _t(naive, quick)
        del mask
        pairs = _moba_pairs(q, k, block, top_k)
        sel = f"{top_k}/{math.ceil(n / block)} blocks of {block}"
        row("moba", sel, "fwd", "sdpa causal", tb, ta, sp, pairs, tm)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        tb, ta, sp = _pair(fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)),
                           fwd_bwd(lambda: moba_attention(qg, kg, vg, block, top_k, scale)), quick)
        row("moba", sel, "fwd+bwd", "sdpa causal", tb, ta, sp, pairs, backward=True)
        # one decoding step: one query row per head over a cache of n keys, blocks of 64 as the frontier's MoBA;
        # the gate is recomputed from the cached keys every step, the kernel reads the chosen blocks in place
        qd = q[:, :, -1:].detach().contiguous()
        nb = math.ceil(n / DECODE_BLOCK)
        with torch.no_grad():
            for frac in (8, 2):
                tk = max(1, nb // frac)
                step = lambda tk=tk: [moba_attention(qd, k, v, DECODE_BLOCK, tk, scale, n - 1)  # noqa: E731
                                      for _ in range(DECODE_CALLS)]
                base = lambda: [F.scaled_dot_product_attention(qd, k, v, scale=scale)  # noqa: E731
                                for _ in range(DECODE_CALLS)]
                tb, ta, sp = _pair(base, step, quick)
                row("moba", f"{tk}/{nb} blocks of {DECODE_BLOCK}", "decode step", "sdpa", tb / DECODE_CALLS,
                    ta / DECODE_CALLS, sp, float(min(tk * DECODE_BLOCK, n)))

    if "minference" in only:
        # vertical-slash prefill at the frontier's budgets: f * n / 2 columns + f * n / 2 diagonals per head
        q, k, v = bench_qkv(n, dev, dt, heads=HEADS, head_dim=HEAD_DIM)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # noqa: E731
        with torch.no_grad():
            for f in (0.25, 0.125):
                nv = int(f * n) // 2
                vs = lambda nv=nv: vertical_slash_attention(q, k, v, nv, nv, scale=scale)  # noqa: E731
                tb, ta, sp = _pair(sdpa, vs, quick)
                vert, slash = vertical_slash_select(q, k, nv, nv, scale=scale)
                pairs = float(vertical_slash_mask(vert, slash, n, n).sum() / HEADS)
                row("minference", f"vertical-slash {nv}+{nv} (f={f})", "fwd", "sdpa causal", tb, ta, sp, pairs)

    if "biformer" in only:
        gh = 2 ** (int(math.log2(n)) // 2)
        grid = (gh, n // gh)
        regions = (8, 8)
        nR = regions[0] * regions[1]
        q, k, v = bench_qkv(n, dev, dt, heads=HEADS, head_dim=HEAD_DIM)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)  # noqa: E731
        for top_k in (nR // 16, nR // 8):
            bif = lambda top_k=top_k: biformer_attention(q, k, v, grid, regions, top_k, scale)  # noqa: E731
            with torch.no_grad():
                tb, ta, sp = _pair(sdpa, bif, quick)
                mem = peak_memory(bif, dev)
                if top_k == nR // 8:
                    mask = biformer_mask(q, k, grid, regions, top_k)
                    tm = _t(lambda m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale), quick)
                    del mask
                else:
                    tm = None
            pairs = float(n * top_k * (n // nR))
            sel = f"{top_k}/{nR} regions, grid {grid[0]}x{grid[1]}"
            row("biformer", sel, "fwd", "sdpa dense", tb, ta, sp, pairs, tm, mem)
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        top_k = nR // 8
        tb, ta, sp = _pair(fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, scale=scale)),
                           fwd_bwd(lambda: biformer_attention(qg, kg, vg, grid, regions, top_k, scale)), quick)
        row("biformer", f"{top_k}/{nR} regions, grid {grid[0]}x{grid[1]}", "fwd+bwd", "sdpa dense", tb, ta, sp,
            float(n * top_k * (n // nR)), backward=True)
    return rep
