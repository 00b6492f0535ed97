"""``attnlab bench selection``: how much of dense attention each content-based selection keeps.

On seeded inputs with planted structure (a sink key, a few heavy columns, local similarity, heads of
increasing sharpness), every method builds its selection; ``core.sparse.selection_recall`` then reports per
head the sparsity, the attention mass kept, the recall of each query's true top keys, and the relative error of
the selected (masked float64) output against dense attention. Every registered ``routing`` mechanism has a row
(a test enforces it); ``.delta`` rows add the delta correction [D99] (its sampled rows count as selected).
Writes JSON, Markdown and a PNG under ``runs/``.

    attnlab bench selection                      # length 512, 4 heads
    attnlab bench selection --length 1024 --methods moba hip
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.sparse import masked_reference, selection_mask, selection_recall
from .common import Report, new_run_dir

COLUMNS = ["method", "head", "sparsity", "mass", "top_recall", "out_err"]


@dataclass(frozen=True)
class SelectionMethod:
    """``mask(q, k) -> (B, 1 or H, Tq, Tk)`` bool selection (``mask(q, k, v)`` when ``values``: value-derived
    selections); ``causal``: compare with causal (else full) attention; ``correction``: the delta correction
    [D99] on top (sampling stride, 0 = off)."""

    name: str
    mask: Callable[..., Tensor]
    causal: bool = True
    correction: int = 0
    values: bool = False


def recall_report(methods: list[SelectionMethod], q: Tensor, k: Tensor, v: Tensor) -> list[dict[str, Any]]:
    """One row per (method, head): sparsity, attention mass kept, top-key recall, relative output error.

    q (B, H, T, D), k, v (B, Hkv, T, D). ``out_err`` = ||masked - dense|| / ||dense|| (float64, per head).
    """
    rows = []
    T = q.shape[2]
    for m in methods:
        allowed = torch.ones(T, T, dtype=torch.bool, device=q.device)
        if m.causal:
            allowed = allowed.tril()
        mask = (m.mask(q, k, v) if m.values else m.mask(q, k)) & allowed
        dense = masked_reference(q, k, v, allowed.view(1, 1, T, T))
        out = masked_reference(q, k, v, mask)
        if m.correction:  # the sampled rows are computed densely: count them as selected
            sample = torch.arange(T, device=q.device) // m.correction * m.correction
            out = out + (dense - out)[:, :, sample]
            mask = mask.expand(*mask.shape[:2], T, T).clone()
            mask[:, :, :: m.correction] = allowed[:: m.correction]
        stats = selection_recall(q, k, mask, causal=m.causal)
        err = (out - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2))  # (B, H)
        for h in range(q.shape[1]):
            rows.append({"method": m.name, "head": h, "sparsity": float(stats["sparsity"][h]),
                         "mass": float(stats["mass"][h]), "top_recall": float(stats["top_recall"][h]),
                         "out_err": float(err[:, h].mean())})
    return rows


def planted_qkv(B: int = 1, H: int = 4, T: int = 512, D: int = 32, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded float64 q, k, v (B, H, T, D) with a sink (key 0), 4 heavy columns, local similarity (slowly
    varying shared content) and heads of increasing sharpness (head h scales its queries by 0.5 + h / H)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    base = rnd(B * H, D, T // 16 + 1)
    base = F.interpolate(base, size=T, mode="linear").transpose(1, 2).reshape(B, H, T, D)
    shared = rnd(B, H, 1, D)
    q = base + 0.5 * rnd(B, H, T, D) + 0.5 * shared
    k = base + 0.5 * rnd(B, H, T, D)
    cols = torch.randperm(T - 1, generator=g)[:4] + 1
    k[:, :, cols] += 1.5 * shared
    k[:, :, 0] += 2.0 * shared[:, :, 0]
    q = q * (0.5 + torch.arange(H, dtype=torch.float64) / H).view(1, H, 1, 1)
    return q, k, rnd(B, H, T, D)


def grid_2d(T: int, regions: int = 4) -> tuple[int, int] | None:
    """The squarest ``(gh, gw)`` grid of T tokens with both sides divisible by ``regions`` (None if none)."""
    for gh in range(int(T**0.5), 0, -1):
        if T % gh == 0 and gh % regions == 0 and (T // gh) % regions == 0:
            return gh, T // gh
    return None


def default_methods(T: int) -> list[SelectionMethod]:
    """Every content-based selection of the repository at about 1/8 to 1/4 density for length ``T``.

    Names are the registered mechanism (or ``mechanism.variant``); learned selections get a seeded stand-in
    (DMA: a random value projection for the importance; Sparsifiner: a shared random rank-8 projection of q and
    k as the predictor; Routing Transformer: random centroids).
    """
    from ..mechanisms.routing import (
        biformer,
        delta_layers,
        dhsa,
        dma,
        hip,
        minference,
        moba,
        rectified,
        recycled,
        routing_transformer,
        ssa,
        superlinear,
        vmoba,
    )

    blk = max(4, T // 16)

    def seeded(*shape, dtype):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=dtype)

    def vs(q, k):
        vert, slash = minference.vertical_slash_select(q, k, T // 16, T // 16, last_q=min(64, T))
        return minference.vertical_slash_mask(vert, slash, T, T)

    def btk(q, k):
        sel, valid = minference.block_topk_select(q, k, blk, 2)
        return minference.block_topk_mask(sel, valid, blk, T, T)

    def hp_block(q, k):
        sel, valid = hip.hip_select(q, k, blk, 2)
        return minference.block_topk_mask(sel, valid, blk, T, T)

    def hp(q, k):  # the registered layer: per-query tree search
        sel, valid = hip.hip_row_select(q, k, blk, 2, 0)
        return selection_mask(sel, valid, moba.block_sets(T, blk, q.device), T)

    def rt(q, k):
        cent = F.normalize(seeded(q.shape[1], 4, q.shape[-1], dtype=q.dtype), dim=-1)
        return routing_transformer.routing_mask(q, k, cent)

    def dh(q, k):
        sel, valid, sets = dhsa.dhsa_select(q, q, k, 3, max(2, T // 32), max(4, T // 16), 0.5, 0)
        return selection_mask(sel, valid, sets, T)

    def dm(q, k, v):  # importance from the values of all heads through a seeded projection, as the layer's
        w = seeded(v.shape[1] * v.shape[-1], v.shape[1], dtype=v.dtype) * v.shape[-1] ** -0.5
        bias = torch.exp(-F.softplus(v.transpose(1, 2).flatten(2) @ w)).transpose(1, 2)  # (B, Hkv, T)
        return dma.dma_mask(bias, T, max(1, T // 8), 0)

    def sp(q, k):  # Sparsifiner's top-k of a low-rank connectivity; bidirectional
        r = seeded(q.shape[-1], 8, dtype=q.dtype) / 8**0.5
        idx = (q @ r @ (k @ r).transpose(-1, -2)).topk(max(1, T // 8), dim=-1).indices
        return torch.zeros(q.shape[:3] + (T,), dtype=torch.bool).scatter_(-1, idx, True)

    def sl(q, k):
        stride = max(2, T // 32)
        return superlinear.superlinear_mask(q, k, stride, stride, 2)

    def ds(q, k):  # each position a DELTA decoding step
        return delta_layers.select_rows(q, k, max(1, T // 16), max(1, T // 32), 0).unsqueeze(1)

    def rc(q, k):  # each position past the first a decoding step; a dense full step every 8
        return recycled.recycled_mask(q, k, max(1, T // 16), 8, 1)

    def rx(q, k):  # Rectified SpaAttn's exactly read blocks (own + 2 past by pooled logit); the pooled rest is no mask
        nb = -(-T // blk)
        counts = torch.full((nb,), float(blk), dtype=q.dtype)
        counts[-1] = T - (nb - 1) * blk
        a = rectified.pooled_logits(q, moba.block_means(k, blk), counts, q.shape[-1] ** -0.5)
        own = torch.arange(T) // blk
        past = torch.arange(nb).view(1, nb) < own.view(T, 1)
        val, idx = a.masked_fill(~past, float("-inf")).topk(min(2, nb), dim=-1)
        sel = torch.cat([own.view(1, 1, T, 1).expand(*a.shape[:2], T, 1), idx], -1)
        valid = torch.cat([torch.ones(*a.shape[:2], T, 1, dtype=torch.bool), torch.isfinite(val)], -1)
        return selection_mask(sel, valid, moba.block_sets(T, blk, q.device), T)

    def sa(q, k):  # SSA's training-time draw (seed 0): a content-free, locality-biased baseline
        return ssa.ssa_mask(q, k, q_offset=0, rate=0.25, block=blk, seed=0)

    methods = [
        SelectionMethod("moba", lambda q, k: moba.moba_mask(q, k, blk, 3)),
        SelectionMethod("rectified", rx),
        SelectionMethod("ssa", sa),
        SelectionMethod("minference.vertical_slash", vs),
        SelectionMethod("minference.vertical_slash.delta", vs, correction=8),
        SelectionMethod("minference.block_topk", btk),
        SelectionMethod("hip", hp),
        SelectionMethod("hip.block", hp_block),
        SelectionMethod("routing_transformer", rt),
        SelectionMethod("dhsa", dh),
        SelectionMethod("dma", dm, values=True),
        SelectionMethod("superlinear", sl),
        SelectionMethod("delta_select", ds),
        SelectionMethod("delta_select.delta", ds, correction=8),
        SelectionMethod("recycled", rc),
        SelectionMethod("sparsifiner", sp, causal=False),
    ]
    grid = grid_2d(T)
    if grid is not None:  # BiFormer: 4 x 4 regions of a 2-D grid, 3 routed per query region; bidirectional
        methods.append(SelectionMethod("biformer", lambda q, k: biformer.biformer_mask(q, k, grid, (4, 4), 3),
                                       causal=False))
    side = round(T ** (1 / 3))
    if side**3 == T and side % 8 == 0:  # a cubic video grid: VMoBA's partitions, bidirectional
        grid3, tile = (side,) * 3, (2, side // 2, side // 2)
        for part, top_k in (("1d", side // 8), ("2d", side), ("3d", side // 2)):  # 1/4 of the blocks each
            methods.append(SelectionMethod(
                f"vmoba.{part}", lambda q, k, p=part, n=top_k: vmoba.vmoba_mask(q, k, grid3, tile, p, n),
                causal=False))
    return methods


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selection", help="sparsity and recall of attention mass per content-based selection method")
    p.add_argument("--length", type=int, default=512, help="sequence length (a cube, e.g. 512, adds VMoBA; a grid with sides divisible by 4 adds BiFormer)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, help="only these method names")
    p.add_argument("--out", default="runs", help="folder for the run directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    q, k, v = planted_qkv(1, args.heads, args.length, args.head_dim, args.seed)
    methods = default_methods(args.length)
    if args.methods:
        unknown = sorted(set(args.methods) - {m.name for m in methods})
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {[m.name for m in methods]}")
        methods = [m for m in methods if m.name in args.methods]
    report = Report("selection", COLUMNS, meta={"length": args.length, "heads": args.heads,
                                                 "head_dim": args.head_dim, "seed": args.seed,
                                                 "inputs": "planted: sink, 4 heavy columns, local, sharper heads"},
                    plots=[_plot])
    for row in recall_report(methods, q, k, v):
        report.add(**row)
    run_dir = new_run_dir("selection", args.out)
    report.write(run_dir)
    report.print()
    print(f"wrote {run_dir}")
    return 0


def _plot(report: Report, run_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for r in report.rows))
    if not names:
        return None
    mean = {c: [sum(r[c] for r in report.rows if r["method"] == n) / sum(r["method"] == n for r in report.rows)
                for n in names] for c in ("sparsity", "mass", "top_recall")}
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
    x = torch.arange(len(names)).tolist()
    for i, c in enumerate(("sparsity", "mass", "top_recall")):
        ax.bar([xi + (i - 1) * 0.27 for xi in x], mean[c], width=0.27, label=c)
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"selection quality (mean over heads), length {report.meta.get('length')}")
    ax.legend()
    fig.tight_layout()
    path = run_dir / "selection_recall.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
